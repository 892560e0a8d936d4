"""The toy video builder turns a toy image pipeline into an AnimateDiffPipeline (motion modules, and by default the
spatial layers, trained on clips)."""

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


def test_build_can_train_only_motion_modules_and_loads_back(tiny_base, tmp_path):
    from diffusers import AnimateDiffPipeline, UNet2DConditionModel

    from mmalign.pipelines import load_pipeline

    toy_video_build(tmp_path / "v", base=tiny_base, **SMOKE, train_spatial=False)
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


def test_frame_noise_shares_the_asked_fraction_of_each_frames_variance():
    from mmalign.pipelines.toy_video import frame_noise

    shape = (4000, 2, 3, 2, 2)
    plain = frame_noise(shape, 0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(
        plain, torch.randn(shape, generator=torch.Generator().manual_seed(1))
    )  # i.i.d. unchanged
    x = frame_noise(shape, 0.7, generator=torch.Generator().manual_seed(1))
    assert x.std().item() == pytest.approx(1.0, abs=0.02)  # every frame stays N(0, I)
    f0, f2 = x[:, :, 0].flatten(), x[:, :, 2].flatten()
    assert torch.corrcoef(torch.stack([f0, f2]))[0, 1].item() == pytest.approx(0.7, abs=0.03)
    with pytest.raises(ValueError, match="noise correlation 1.0"):
        frame_noise(shape, 1.0)


def test_coherence_stats_tell_rendered_clips_from_frames_of_different_clips():
    from mmalign.toy.render import COLORS, SHAPES, ShapeSpec, render_video
    from mmalign.toy.video_build import coherence_stats

    prompts = [ShapeSpec(c, s).caption() for c in sorted(COLORS) for s in SHAPES][:24]
    clips = torch.stack([render_video(p, seed=i, frames=8, size=32) for i, p in enumerate(prompts)])
    steady = coherence_stats(clips, prompts)
    assert steady["jump_rate"] == 0 and steady["colour_constant"] == 1 and steady["color_correct"] == 1
    assert 0.15 <= steady["travel"] <= 0.3  # the rendered motion
    g = torch.Generator().manual_seed(0)
    mixed = torch.stack([clips[torch.randperm(len(clips), generator=g), t] for t in range(8)], dim=1)
    torn = coherence_stats(mixed, prompts)
    assert torn["jump_rate"] > 0.5 and torn["colour_constant"] < 0.2 and torn["color_correct"] < 0.5


def test_generate_videos_starts_from_correlated_noise_when_asked(tiny_base, tmp_path):
    from mmalign.pipelines.toy_video import frame_noise

    pipe = toy_video_build(tmp_path / "v", base=tiny_base, **SMOKE)
    seeds, prompts = [3, 4], ["a red circle", "a blue square"]
    kw = dict(frames=4, size=16, steps=2)
    iid = generate_videos(pipe, prompts, seeds, **kw)
    assert torch.equal(iid, generate_videos(pipe, prompts, seeds, noise_correlation=0.0, **kw))
    mixed = generate_videos(pipe, prompts, seeds, noise_correlation=0.9, **kw)
    shape = (1, 4, 4, 8, 8)
    latents = torch.cat([frame_noise(shape, 0.9, generator=torch.Generator().manual_seed(s)) for s in seeds])
    from mmalign.toy.sample import generate

    direct = generate(
        pipe, prompts, seeds, guidance_scale=1.0, steps=2, size=16, num_frames=4, latents=latents
    )
    assert torch.equal(mixed, direct) and not torch.equal(mixed, iid)


def test_build_can_train_the_spatial_layers_with_an_x0_weighted_loss(tiny_base, tmp_path):
    from diffusers import AnimateDiffPipeline, UNet2DConditionModel

    toy_video_build(tmp_path / "v", base=tiny_base, **SMOKE, train_spatial=True, x0_weight_cap=5.0)
    pipe = AnimateDiffPipeline.from_pretrained(tmp_path / "v")
    spatial = dict(UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").named_parameters())
    changed = [
        name
        for name, p in pipe.unet.named_parameters()
        if "motion_modules" not in name and not torch.equal(p, spatial[name].half().float())
    ]
    assert any("attn2" in n for n in changed) and any("conv_in" in n for n in changed)
    info = json.loads((tmp_path / "v" / "toy_video_build.json").read_text())
    assert info["config"]["train_spatial"] is True and info["config"]["x0_weight_cap"] == 5.0


def test_build_video_cli_parses_booleans(tmp_path, capsys):
    from types import SimpleNamespace

    from mmalign.toy.video_build import cmd_toy_build_video

    args = SimpleNamespace(set=["train_spatial=maybe"], out=str(tmp_path / "v"), base="unused", seed=0)
    assert cmd_toy_build_video(args) == 2
    assert "train_spatial takes true or false" in capsys.readouterr().out


@pytest.mark.parametrize(
    "item, message",
    [
        ("x0_weight_cap=abc", "x0_weight_cap takes a float"),
        ("noise_correlation=1.5", "noise_correlation=1.5 must be in [0, 1)"),
        ("x0_weight_cap=-1", "x0_weight_cap=-1.0 must be >= 0"),
    ],
)
def test_build_video_cli_refuses_bad_values_in_one_line_before_building(item, message, tmp_path, capsys):
    from types import SimpleNamespace

    from mmalign.toy.video_build import cmd_toy_build_video

    args = SimpleNamespace(set=[item], out=str(tmp_path / "v"), base="unused", seed=0)
    assert cmd_toy_build_video(args) == 2
    assert message in capsys.readouterr().out and not (tmp_path / "v").exists()
