"""``mmalign cache``: fills the cache `mmalign train` reads, in the recipe's precision unless --dtype says otherwise."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from mmalign.cli import main


def no_weights(*args, **kwargs):
    raise AssertionError("mmalign cache read a denoiser's weights")


def text_dtypes(cache_dir):
    dtypes = set()
    for shard in cache_dir.rglob("text-*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            dtypes |= {str(f.get_tensor(k).dtype) for k in f.keys()}
    return dtypes


@pytest.mark.parametrize("dtype, expected", [(None, "torch.float32"), ("bf16", "torch.bfloat16")])
def test_cache_command_dtype(tiny_sd15, pair_manifest, tmp_path, dtype, expected, monkeypatch):
    """The text encoders in the recipe's precision (or --dtype's); the UNet's weights are never read."""
    from diffusers import UNet2DConditionModel

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_weights)
    config = tmp_path / "cfg.yaml"
    config.write_text("method:\n  name: diffusion_dpo\n")
    args = [
        "cache",
        str(config),
        f"model.pretrained={tiny_sd15}",
        "model.resolution=16",
        f"data.source={pair_manifest}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.output_dir={tmp_path / 'run'}",
        "train.progress=false",
        "--device",
        "cpu",
    ]
    if dtype:
        args += ["--dtype", dtype]
    assert main(args) == 0
    assert text_dtypes(tmp_path / "cache") == {expected}
    assert list((tmp_path / "cache").rglob("latents-*.safetensors"))


def test_cache_command_fills_the_video_pair_cache_that_train_reads(tmp_path, monkeypatch):
    """DenseDPO's clips are encoded ahead of training too (without reading the denoiser's weights); the run then
    never calls the VAE."""
    from diffusers import UNetMotionModel
    from test_dense_dpo_train import video_cfg, write_video_pairs

    from mmalign.pipelines.toy_video import ToyVideoAdapter
    from mmalign.toy.tiny import build_tiny_toy_video
    from mmalign.trainers.loop import train

    build_tiny_toy_video(tmp_path / "toy-video")
    pairs = write_video_pairs(tmp_path / "pairs")
    config = tmp_path / "cfg.yaml"
    config.write_text("method:\n  name: dense_dpo\n")
    common = [f"data.source={pairs}", f"data.cache_dir={tmp_path / 'cache'}", "data.cache=true"]
    args = [
        "cache",
        str(config),
        f"model.pretrained={tmp_path / 'toy-video'}",
        "model.resolution=16",
        *common,
    ]
    with monkeypatch.context() as patch:
        patch.setattr(UNetMotionModel, "from_pretrained", no_weights)
        assert main([*args, "--device", "cpu"]) == 0
    assert list((tmp_path / "cache").rglob("*.safetensors"))

    def no_vae(*a, **k):
        raise AssertionError("train encoded a clip the cache command had cached")

    monkeypatch.setattr(ToyVideoAdapter, "latent_moments", no_vae)
    result = train(video_cfg(tmp_path / "toy-video", pairs, tmp_path / "run", *common))
    assert result.summary["data"]["pairs"] == 4


def test_cache_memory_bench_loads_the_denoiser_in_one_mode_only(tiny_sd15):
    """bench/bench_cache_memory.py on the tiny pipeline: both modes load the same model, the empty one holds none
    of the denoiser's parameters in memory."""
    from conftest import load_bench

    row = load_bench("bench_cache_memory").main(["--model", str(tiny_sd15)])
    assert row["loaded"]["denoiser_params_in_memory"] == row["loaded"]["denoiser_params"] > 0
    assert row["empty"]["denoiser_params_in_memory"] == 0
    assert row["empty"]["denoiser_params"] == row["loaded"]["denoiser_params"]
