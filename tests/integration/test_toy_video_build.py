"""The toy video builder turns a toy image pipeline into an AnimateDiffPipeline whose motion modules (only) learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmalign.toy.video_build import (
    ToyVideoBuildConfig,
    flicker_stats,
    generate_videos,
    render_clips,
    toy_video_build,
)

torch.set_num_threads(1)
SMOKE = dict(frames=4, size=16, segments=2, num_clips=6, p_flicker=0.5, steps=2, batch=2, log=lambda s: None)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random StableDiffusionPipeline over the toy vocabulary (x2 VAE: 16 px -> 8x8 latents)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from mmalign.toy.render import TOY_WORDS
    from mmalign.toy.tiny import _text_encoder, _vae
    from mmalign.toy.tokenizer import build_word_tokenizer

    out = tmp_path_factory.mktemp("tiny-toy-sd")
    tokenizer = build_word_tokenizer(TOY_WORDS, out / "_tok")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    StableDiffusionPipeline(
        vae=_vae(2),
        text_encoder=_text_encoder(16, None, len(tokenizer), 1, tokenizer.model_max_length),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(out, safe_serialization=True)
    return out


def test_render_clips_flicker_a_fraction_in_random_segments():
    clips, captions, flicker = render_clips(
        ToyVideoBuildConfig(frames=8, size=16, num_clips=40, p_flicker=0.5)
    )
    assert clips.shape == (40, 8, 3, 16, 16) and len(captions) == 40
    segs = [s for s in flicker if s is not None]
    assert 10 <= len(segs) <= 30 and len(set(segs)) > 1  # about half flicker, not always in one segment
    rate = flicker_stats(clips, segments=4)["flicker_rate"]
    assert rate == pytest.approx(len(segs) / 40)  # the reward finds exactly the rendered flicker


def test_build_trains_only_motion_modules_and_loads_back(tiny_base, tmp_path):
    from diffusers import AnimateDiffPipeline, UNet2DConditionModel

    from mmalign.pipelines import load_pipeline

    toy_video_build(tmp_path / "v", base=tiny_base, **SMOKE)
    pipe = AnimateDiffPipeline.from_pretrained(tmp_path / "v")
    assert type(pipe.unet).__name__ == "UNetMotionModel" and pipe.motion_adapter is None
    spatial = dict(UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").named_parameters())
    moved = 0
    for name, p in pipe.unet.named_parameters():
        if "motion_modules" in name:
            # proj_out of a motion module starts at zero: non-zero means it trained
            moved += name.endswith("proj_out.weight") and bool(p.abs().sum() > 0)
        else:
            assert torch.equal(p, spatial[name].half().float()), (
                f"spatial weight {name} changed"
            )  # stored fp16
    assert moved > 0
    info = json.loads((tmp_path / "v" / "toy_video_build.json").read_text())
    assert info["config"]["steps"] == 2 and info["seconds"] >= 0
    _, family = load_pipeline(str(tmp_path / "v"))
    assert family == "toy_video"
    pipe.set_progress_bar_config(disable=True)
    a = generate_videos(pipe, ["a red circle", "a blue square"], [3, 4], frames=4, size=16, steps=2)
    b = generate_videos(pipe, ["a blue square"], [4], frames=4, size=16, steps=2)
    assert a.shape == (2, 4, 3, 16, 16)
    assert torch.allclose(a[1], b[0], atol=1e-5)  # clip i depends only on (prompt i, seed i)


def test_build_is_deterministic(tiny_base, tmp_path):
    from safetensors.torch import load_file

    for d in ("a", "b"):
        toy_video_build(tmp_path / d, base=tiny_base, **SMOKE)
    part = "unet/diffusion_pytorch_model.safetensors"
    wa, wb = load_file(tmp_path / "a" / part), load_file(tmp_path / "b" / part)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_high_t_fraction_trains_where_the_layout_forms(tiny_base, tmp_path, monkeypatch):
    """``high_t_fraction``: that share of each batch draws t from [high_t_min, T) (1.0: all of it)."""
    from mmalign.pipelines import toy_video

    seen = []
    predict = toy_video.ToyVideoAdapter.predict

    def record(self, denoiser, xt, t, cond):
        seen.append(t.clone())
        return predict(self, denoiser, xt, t, cond)

    monkeypatch.setattr(toy_video.ToyVideoAdapter, "predict", record)
    smoke = {**SMOKE, "steps": 5, "batch": 4}
    toy_video_build(tmp_path / "high", base=tiny_base, **smoke, high_t_fraction=1.0, high_t_min=900)
    high = torch.cat(seen[:5])
    seen.clear()
    toy_video_build(tmp_path / "plain", base=tiny_base, **smoke)
    plain = torch.cat(seen[:5])
    assert len(high) == len(plain) == 20
    assert (high >= 900).all() and (plain < 900).any()
