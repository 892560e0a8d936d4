"""Adding a family is one adapter file plus one registry line, and no edit to the loop.

``RectifiedFlowSD`` below is a whole family, written against the Protocol only: a Stable Diffusion-shaped pipeline
(CLIP text encoder, AutoencoderKL, UNet2DConditionModel) trained as a rectified flow (x_t = (1 - s) x0 + s eps,
target eps - x0, timestep 1000 s), as InstaFlow/SD3-style fine-tunes are. It is registered at run time and
trains Diffusion-DPO through the unchanged loop; a DDPM-only method is refused for it at config time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import assert_only_trainable_changed

from mmalign.config import ConfigError
from mmalign.pipelines import FAMILIES, Family, PipelineAdapter
from mmalign.trainers import load_config
from mmalign.trainers.loop import train

torch.set_num_threads(1)


@dataclass
class RectifiedFlowSD:
    """A Stable Diffusion-shaped pipeline trained as a rectified flow."""

    pipeline: Any
    family: str = "rf_sd"
    denoiser_name: str = "unet"
    noise_process: str = "flow"
    micro_conditioning: bool = False

    def __post_init__(self) -> None:
        self.scheduler = self.pipeline.scheduler
        self.vae = self.pipeline.vae

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.pipeline.text_encoder]

    @torch.no_grad()
    def encode_prompts(self, prompts):
        tok = self.pipeline.tokenizer
        ids = tok(
            list(prompts),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return {
            "encoder_hidden_states": self.pipeline.text_encoder(ids.to(self.pipeline.text_encoder.device))[0]
        }

    @torch.no_grad()
    def latent_moments(self, pixels):
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def latents_from_moments(self, mean, std, generator=None):
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        return (mean.float() + std.float() * eps) * self.vae.config.scaling_factor

    def encode_media(self, pixels, generator=None):
        return self.latents_from_moments(*self.latent_moments(pixels), generator)

    def extra_conditioning(self, meta, resolution):
        return {}

    def add_noise(self, x0, noise, t):
        s = (t.float() / 1000).reshape(-1, *[1] * (x0.ndim - 1))
        return (1 - s) * x0 + s * noise

    def target(self, x0, noise, t):
        return noise - x0

    def predict(self, denoiser, xt, t, cond):
        dtype = next(denoiser.parameters()).dtype
        return denoiser(xt.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype)).sample

    def sample_timesteps(self, n, generator, device):
        return (torch.rand(n, generator=generator) * 1000).to(device)


@pytest.fixture
def rf_family(monkeypatch):
    monkeypatch.setitem(
        FAMILIES, "rf_sd", Family("StableDiffusionPipeline", RectifiedFlowSD, "flow")
    )  # the one line


def cfg_for(model, manifest, out, *extra):
    return load_config(
        None,
        [
            f"model.pretrained={model}",
            "model.family=rf_sd",
            "model.resolution=16",
            f"data.source={manifest}",
            f"train.output_dir={out}",
            "train.max_steps=2",
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


def test_the_adapter_satisfies_the_protocol(rf_family, tiny_sd15):
    from mmalign.pipelines import load_pipeline, make_adapter

    pipe, family = load_pipeline(str(tiny_sd15), family="rf_sd")
    assert isinstance(make_adapter(pipe, family), PipelineAdapter)


def test_a_new_family_trains_diffusion_dpo_through_the_unchanged_loop(
    rf_family, tiny_sd15, pair_manifest, tmp_path
):
    from diffusers import UNet2DConditionModel

    result = train(cfg_for(tiny_sd15, pair_manifest, tmp_path / "run"), keep_initial=True)
    assert result.summary["family"] == "rf_sd" and result.summary["steps"] == 2
    pretrained = dict(UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").named_parameters())
    trainable, frozen = assert_only_trainable_changed(result, pretrained)
    assert trainable > 0 and frozen > 0


@pytest.mark.parametrize("method", ["self_npo", "inversion_dpo"])
@pytest.mark.parametrize("family", ["rf_sd", "wan"])
def test_ddpm_only_methods_are_refused_on_flow_families_with_one_sentence(
    rf_family, tiny_sd15, pair_manifest, tmp_path, method, family
):
    with pytest.raises(ConfigError) as err:
        cfg_for(tiny_sd15, pair_manifest, tmp_path / "run", f"method.name={method}", f"model.family={family}")
    message = str(err.value)
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    assert f"method.name={method}" in message and f"model.family={family}" in message
    assert "alphas_cumprod" in message and "flow" in message
