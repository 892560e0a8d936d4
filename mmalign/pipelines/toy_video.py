"""Toy video family: diffusers' AnimateDiffPipeline (UNetMotionModel = an SD UNet2DConditionModel plus
temporal motion modules, a per-frame AutoencoderKL, a CLIP text encoder, DDPM epsilon by default), small
enough to train and sample on a CPU. (UNet3DConditionModel / TextToVideoSDPipeline would do the same maths
but has no peft adapter support in diffusers, so it cannot take LoRA.)

The VAE encodes each frame on its own (temporal compression 1, one latent frame per pixel frame), so
segment labels map one to one onto latent frames. Latents are [B,C,T,H,W], as for CogVideoX and Wan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmalign.pipelines.base import ddpm_add_noise, ddpm_target, training_scheduler, uniform_timesteps
from mmalign.pipelines.sd15 import clip_hidden_states, scale_latents


def frames_to_batch(pixels: torch.Tensor) -> torch.Tensor:
    """[B,T,3,H,W] -> [B*T,3,H,W]."""
    return pixels.reshape(-1, *pixels.shape[2:])


def frame_noise(
    shape: torch.Size | tuple[int, ...],
    correlation: float = 0.0,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian noise [B,C,T,H,W] whose frames share a ``correlation`` fraction of their variance.

    ``sqrt(rho) * shared + sqrt(1 - rho) * own_t``: every frame is N(0, I) and two frames correlate by rho (the
    "mixed" video noise prior of Ge et al. 2023, PYoCo). ``correlation=0`` draws exactly ``torch.randn(shape)``.
    """
    if not 0.0 <= correlation < 1.0:
        raise ValueError(f"noise correlation {correlation} must be in [0, 1)")
    own = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if correlation == 0.0:
        return own
    shared = torch.randn((*shape[:2], 1, *shape[3:]), generator=generator, device=device, dtype=dtype)
    return correlation**0.5 * shared + (1 - correlation) ** 0.5 * own


@dataclass
class ToyVideoAdapter:
    """Adapter for AnimateDiffPipeline checkpoints (the toy video model; AnimateDiff SD1.5 motion models)."""

    pipeline: Any
    family: str = "toy_video"
    denoiser_name: str = "unet"
    noise_process: str = "ddpm"
    micro_conditioning: bool = False
    temporal_compression: int = 1
    causal: bool = False

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
        """Pixels [B,T,3,H,W] in [-1,1] -> posterior mean and std, each [B,C,T,h,w] (unscaled)."""
        b, t = pixels.shape[:2]
        dist = self.vae.encode(frames_to_batch(pixels).to(self.vae.device, self.vae.dtype)).latent_dist

        def video(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)

        return video(dist.mean), video(dist.std)

    def latents_from_moments(self, mean, std, generator=None) -> torch.Tensor:
        return scale_latents(self.vae, mean, std, generator)

    def encode_media(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents_from_moments(*self.latent_moments(pixels), generator)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B,C,T,h,w] -> videos [B,T,3,H,W] in [0,1]."""
        b, _, t = latents.shape[:3]
        z = latents.permute(0, 2, 1, 3, 4).reshape(b * t, *latents.shape[1:2], *latents.shape[3:])
        x = self.vae.decode(z.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.float()
        return x.reshape(b, t, *x.shape[1:]).add(1).div(2).clamp(0, 1)

    def extra_conditioning(self, meta: dict[str, Any], resolution: int) -> dict[str, torch.Tensor]:
        return {}

    def add_noise(self, x0, noise, t):
        return ddpm_add_noise(self.scheduler, x0, noise, t)

    def target(self, x0, noise, t):
        return ddpm_target(self.scheduler, x0, noise, t)

    def predict(self, denoiser, xt, t, cond):
        """UNetMotionModel on [B,C,T,H,W]; it folds frames into the batch, so the text states repeat per frame
        (as AnimateDiffPipeline does, diffusers 0.42.1)."""
        dtype = next(p.dtype for p in denoiser.parameters())
        text = cond["encoder_hidden_states"].to(dtype).repeat_interleave(xt.shape[2], dim=0)
        return denoiser(xt.to(dtype), t, encoder_hidden_states=text).sample

    def sample_timesteps(self, n, generator, device):
        return uniform_timesteps(self.scheduler, n, generator, device)
