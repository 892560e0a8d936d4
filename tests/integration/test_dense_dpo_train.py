"""DenseDPO training on tiny video pipelines: trainable weights all move, frozen ones stay; data and skip rules."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_only_trainable_changed

from mmalign.data.video import write_video
from mmalign.pipelines import load_pipeline, make_adapter
from mmalign.toy.render import render_video
from mmalign.trainers import load_config
from mmalign.trainers.loop import train

torch.set_num_threads(1)
FPS, FRAMES = 4, 8  # 2 s clips -> two 1 s segments


def write_video_pairs(root, n: int = 4, frames: int = FRAMES, size: int = 16):
    """n pairs: the same moving shape twice, flicker in one clip's segment; labels favour the steady clip there."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        seg = i % 2
        clean = render_video("a red circle", seed=i, frames=frames, size=size)
        flicker = render_video(
            "a red circle", seed=i, frames=frames, size=size, flicker_segment=seg, segments=2
        )
        write_video(root / f"clean{i}.mp4", clean, FPS)
        write_video(root / f"flicker{i}.mp4", flicker, FPS)
        labels = [0, 0]
        labels[seg] = 1 if i < n // 2 else -1
        v0, v1 = (f"clean{i}.mp4", f"flicker{i}.mp4") if i < n // 2 else (f"flicker{i}.mp4", f"clean{i}.mp4")
        rows.append({"prompt": "a red circle moving", "video_0": v0, "video_1": v1, "labels": labels})
    rows.append(
        {"prompt": "a red circle", "video_0": "clean0.mp4", "video_1": "clean0.mp4", "labels": [0, 0]}
    )  # all tie
    manifest = root / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture(scope="module")
def video_pairs(tmp_path_factory):
    return write_video_pairs(tmp_path_factory.mktemp("video-pairs"))


@pytest.fixture(scope="module")
def tiny_toy_video(tmp_path_factory):
    from mmalign.toy.tiny import build_tiny_toy_video

    path = tmp_path_factory.mktemp("tiny-toy-video")
    build_tiny_toy_video(path)
    return path


def video_cfg(model, manifest, out, *extra):
    return load_config(
        None,
        [
            f"model.pretrained={model}",
            "model.resolution=16",
            f"data.source={manifest}",
            f"train.output_dir={out}",
            "method.name=dense_dpo",
            "train.max_steps=3",
            "train.batch_size=2",
            "train.report_to=none",
            "train.progress=false",
            "train.learning_rate=1e-3",
            "train.scale_lr=false",
            "train.checkpoint_every=0",
            "lora.rank=2",
            *extra,
        ],
    )


@pytest.mark.parametrize(
    "loss, extra",
    [("dense", []), ("vanilla", ["method.sft_weight=10", "method.sft_x0_cap=5"])],
    ids=["dense", "vanilla-x0-sft"],
)
def test_toy_video_trainable_change_and_frozen_stay(loss, extra, tiny_toy_video, video_pairs, tmp_path):
    from diffusers import UNetMotionModel

    result = train(
        video_cfg(tiny_toy_video, video_pairs, tmp_path / "run", f"method.loss={loss}", *extra),
        keep_initial=True,
    )
    pretrained = dict(UNetMotionModel.from_pretrained(tiny_toy_video, subfolder="unet").named_parameters())
    trainable, frozen = assert_only_trainable_changed(result, pretrained)
    assert all("lora" in n for n, q in result.denoiser.named_parameters() if q.requires_grad)
    assert trainable > 0 and frozen > 0
    s = result.summary
    assert (
        s["data"]["rows"] == 5 and s["data"]["dropped_few_labels"] == 1 and s["data"]["pairs"] == 4
    )  # all-tie row skipped
    assert s["family"] == "toy_video" and math.isfinite(s["final_metrics"]["loss"])
    assert {"delta_w", "delta_l", "implicit_acc", "non_tie_frac"} <= set(s["final_metrics"])
    if loss == "dense":
        assert s["final_metrics"]["non_tie_frac"] == pytest.approx(
            0.5
        )  # one of two 1 s segments labelled per clip


def test_uncached_batches_match_the_cache_layout(tiny_toy_video, video_pairs, tmp_path):
    from mmalign.trainers.data import video_pairs as video_pair_data

    class Acc:
        is_main_process = True

        def wait_for_everyone(self):
            pass

    pipe, family = load_pipeline(str(tiny_toy_video))
    adapter = make_adapter(pipe, family)
    for cache in ("true", "false"):
        cfg = video_cfg(
            tiny_toy_video, video_pairs, tmp_path / "run", f"data.cache={cache}", "data.caption_dropout=0"
        )
        data = video_pair_data(cfg, adapter, Acc())
        raw = data.collate([data.dataset[i] for i in range(2)])
        batch = data.prepare(raw, torch.device("cpu"))
        assert batch["latents_0"].shape == (2, 4, FRAMES, 8, 8) and batch["labels"].shape == (2, FRAMES)
        assert batch["labels"][0].tolist() == [1] * 4 + [0] * 4  # clip 0: segment 0 labelled, at 4 fps
        assert batch["cond"]["encoder_hidden_states"].shape[0] == 2


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_transformer_families_step_moves_every_lora_weight(family, tmp_path):
    """A DenseDPO step through compute_loss on tiny Wan / CogVideoX transformers with a peft LoRA."""
    from mmalign.trainers.common import TrainModels
    from mmalign.trainers.dense_dpo import DenseDPOConfig, compute_loss
    from mmalign.trainers.loop import add_lora

    if family == "wan":
        from mmalign.toy.tiny import build_tiny_wan as build
    else:
        from mmalign.toy.tiny import build_tiny_cogvideox as build
    build(tmp_path / family)
    pipe, fam = load_pipeline(str(tmp_path / family))
    adapter = make_adapter(pipe, fam)
    net = pipe.transformer.requires_grad_(False)
    frozen_before = {n: p.detach().clone() for n, p in net.named_parameters()}
    add_lora(net, load_config(None, ["lora.rank=2"]).lora)
    params = [p for p in net.parameters() if p.requires_grad]
    start = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-2)
    pixels = torch.rand(2, 2, 9, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {
        "latents_0": adapter.encode_media(pixels[0]),
        "latents_1": adapter.encode_media(pixels[1]),
        "labels": torch.tensor([[1, 0, -1], [-1, -1, 0]]),
        "clip_label": torch.tensor([1, -1]),
        "cond": adapter.encode_prompts(["a red circle", "a blue square"]),
    }
    models = TrainModels(adapter, net)
    for _ in range(2):
        loss, metrics = compute_loss(batch, models, DenseDPOConfig())
        assert loss.requires_grad and math.isfinite(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in net.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), start[n]), f"{n} did not change"
        else:
            assert torch.equal(p.detach(), frozen_before[n.replace(".base_layer", "")]), f"frozen {n} changed"
    assert metrics["non_tie_frac"].item() == pytest.approx(4 / 6)


class CausalFourX:
    """A stand-in causal 4x video VAE family (latent 0 <- frame 0, latent j <- frames 4j-3..4j), enough for the data path."""

    family, denoiser_name, noise_process, micro_conditioning = "fake_causal", "transformer", "ddpm", False
    pipeline = scheduler = vae = None
    temporal_compression, causal = 4, True
    text_encoders: list = []

    def encode_prompts(self, prompts):
        return {"encoder_hidden_states": torch.zeros(len(prompts), 2, 4)}

    def latent_moments(self, pixels):  # [B,T,3,H,W] -> [B,3,T_lat,H,W]
        groups = [pixels[:, :1]] + [pixels[:, i : i + 4] for i in range(1, pixels.shape[1] - 3, 4)]
        mean = torch.stack([g.mean(1) for g in groups], 2)
        return mean, torch.full_like(mean, 0.1)

    def latents_from_moments(self, mean, std, generator=None):
        return mean

    def encode_media(self, pixels, generator=None):
        return self.latent_moments(pixels)[0]

    def extra_conditioning(self, meta, resolution):
        return {}

    def add_noise(self, x0, noise, t):
        return x0 + noise

    def target(self, x0, noise, t):
        return noise

    def predict(self, denoiser, xt, t, cond):
        return xt

    def sample_timesteps(self, n, generator, device):
        return torch.zeros(n, dtype=torch.long)

    def decode_latents(self, latents):
        return latents


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_min_non_tie_applies_to_latent_labels(video_pairs, tmp_path, cache):
    """8 frames at 4 fps, two 1 s segments: a clip labelled only in segment 1 has 50% labelled segments (kept by the
    segment rule) but its latents are frame 0 and frames 1-4, three of them in segment 0: no labelled latent."""
    from mmalign.config import DataConfig
    from mmalign.data.video_pairs import video_pair_data
    from mmalign.pipelines import is_video

    class Acc:
        is_main_process = True

        def wait_for_everyone(self):
            pass

    adapter = CausalFourX()
    assert is_video(adapter)
    data = video_pair_data(
        adapter,
        Acc(),
        DataConfig(source=str(video_pairs), cache=cache),
        cache_dir=tmp_path / "cache",
        model_id={"model": "fake"},
        dense=True,
        min_non_tie=0.2,
        height=16,
        width=16,
        fps=None,
        num_frames=None,
        segment_seconds=1.0,
        straddle="majority",
        video_backend=None,
        progress=False,
    )
    assert data.counts["dropped_few_labels"] == 1  # the all-tie row, by its segment labels
    if cache:
        assert data.counts["dropped_few_latent_labels"] == 2 and len(data.dataset) == 2
        assert all(
            data.dataset[i]["labels"].abs().tolist() == [1, 1] for i in range(2)
        )  # majority: frames 1-4 labelled
    else:
        items = [data.dataset[i] for i in range(len(data.dataset))]
        skipped = [it for it in items if "skipped" in it]
        assert len(skipped) == 2 and all("latent frames" in it["skipped"] for it in skipped)
