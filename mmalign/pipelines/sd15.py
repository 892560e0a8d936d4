"""Stable Diffusion 1.x/2.x family (StableDiffusionPipeline): one CLIP text encoder, UNet2DConditionModel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmalign.pipelines.base import ddpm_add_noise, ddpm_target, training_scheduler, uniform_timesteps


def vae_moments(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of an AutoencoderKL for pixels in [-1, 1] (unscaled latent space)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.contiguous(), dist.std.contiguous()


def scale_latents(
    vae: Any, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample the posterior and apply the VAE's scaling (and shift) factor, as diffusers' training scripts do."""
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    z = mean.float() + std.float() * eps
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z - shift) * vae.config.scaling_factor).contiguous()


def clip_hidden_states(tokenizer: Any, text_encoder: Any, prompts: list[str], layer: int | None = None):
    """Tokenise to the model's max length and run a CLIP text encoder; returns (hidden, output)."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    out = text_encoder(ids, output_hidden_states=layer is not None)
    hidden = out[0] if layer is None else out.hidden_states[layer]
    return hidden, out


def user_conditioning(cond: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
    """``cond["image_embeds"]`` [B, D] (a user vector, :mod:`mmalign.personalize.attention`) -> the UNet's
    ``added_cond_kwargs`` entry for its IP-Adapter projection; empty when there is none."""
    if "image_embeds" not in cond:
        return {}
    return {"image_embeds": [cond["image_embeds"].to(dtype)[:, None, :]]}


@dataclass
class SD15Adapter:
    """Adapter for StableDiffusionPipeline checkpoints (SD1.5, SD2.x, and the toy pipeline)."""

    pipeline: Any
    family: str = "sd15"
    denoiser_name: str = "unet"
    noise_process: str = "ddpm"
    micro_conditioning: bool = False

    def __post_init__(self) -> None:
        self.scheduler = training_scheduler(self.pipeline.scheduler.config)
        self.vae = self.pipeline.vae
        self.text_encoder = self.pipeline.text_encoder
        self.tokenizer = self.pipeline.tokenizer

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden, _ = clip_hidden_states(self.tokenizer, self.text_encoder, list(prompts))
        return {"encoder_hidden_states": hidden}

    @torch.no_grad()
    def latent_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return vae_moments(self.vae, pixels)

    def latents_from_moments(self, mean, std, generator=None) -> torch.Tensor:
        return scale_latents(self.vae, mean, std, generator)

    def encode_media(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents_from_moments(*self.latent_moments(pixels), generator)

    def extra_conditioning(self, meta: dict[str, Any], resolution: int) -> dict[str, torch.Tensor]:
        return {}

    def add_noise(self, x0, noise, t):
        return ddpm_add_noise(self.scheduler, x0, noise, t)

    def target(self, x0, noise, t):
        return ddpm_target(self.scheduler, x0, noise, t)

    def predict(self, denoiser, xt, t, cond):
        dtype = next(p.dtype for p in denoiser.parameters())
        added = user_conditioning(cond, dtype)
        return denoiser(
            xt.to(dtype),
            t,
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            added_cond_kwargs=added or None,
        ).sample

    def sample_timesteps(self, n, generator, device):
        return uniform_timesteps(self.scheduler, n, generator, device)
