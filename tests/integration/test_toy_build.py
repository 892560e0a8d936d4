"""The toy builder makes a real StableDiffusionPipeline that from_pretrained loads; the shipped weights load."""

import json
from pathlib import Path

import pytest
import torch

from mmalign.toy import DEFAULT_TOY_MODEL
from mmalign.toy.build import toy_build
from mmalign.toy.render import TOY_WORDS


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy-sd")
    toy_build(out, vae_steps=3, unet_steps=3, num_images=64, log=lambda s: None)
    return out


def test_build_saves_a_loadable_sd_pipeline(smoke_build):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(smoke_build)
    assert type(pipe.vae).__name__ == "AutoencoderKL" and type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert pipe.text_encoder.config.num_hidden_layers == 2
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 8
    ids = pipe.tokenizer("a small red circle on the left").input_ids
    assert len(ids) == 2 + 7  # one token per toy word, plus BOS/EOS
    assert all(len(pipe.tokenizer(w).input_ids) == 3 for w in TOY_WORDS)
    images = pipe(
        ["a red circle"],
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 3, 32, 32)
    info = json.loads((smoke_build / "toy_build.json").read_text())
    assert info["config"]["unet_steps"] == 3 and info["seconds"] >= 0
    assert all(p.suffix == ".safetensors" for p in smoke_build.rglob("*diffusion_pytorch_model*"))


def test_build_is_deterministic(smoke_build, tmp_path):
    from safetensors.torch import load_file

    toy_build(tmp_path, vae_steps=3, unet_steps=3, num_images=64, log=lambda s: None)
    for part in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        a, b = load_file(smoke_build / part), load_file(tmp_path / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.skipif(not (DEFAULT_TOY_MODEL / "model_index.json").is_file(), reason="toy weights not built")
def test_shipped_weights_are_small_and_load():
    from mmalign.toy.sample import load_toy_pipeline

    size = sum(p.stat().st_size for p in DEFAULT_TOY_MODEL.rglob("*.safetensors"))
    assert size <= 20 * 2**20
    pipe = load_toy_pipeline()
    assert pipe.unet.config.block_out_channels == [64, 128] or pipe.unet.config.block_out_channels == (
        64,
        128,
    )
