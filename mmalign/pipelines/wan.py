"""Wan 2.1 family (WanPipeline): UMT5 text encoder, AutoencoderKLWan (8x spatial, causal 4x temporal,
per-channel latent normalisation), WanTransformer3DModel, rectified-flow matching.

Training maths (DESIGN §2; finetrainers' Wan specification and diffusers 0.42.1 ``WanPipeline``):
sigma = shift * u / (1 + (shift - 1) * u) with u ~ U(0, 1) (or logit-normal), the ``shift`` read from the
pipeline scheduler (UniPC ``flow_shift``, FlowMatchEuler ``shift``); x_t = (1 - sigma) x0 + sigma noise;
the transformer gets timestep t = 1000 sigma; target = noise - x0. In this adapter ``t`` is that
timestep (float, in [0, 1000]) everywhere: ``add_noise``, ``target`` and ``predict`` divide by 1000.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmalign.utils import expand_like

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow schedules' timestep shift: sigma = shift u / (1 + (shift - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


@dataclass
class WanAdapter:
    """Adapter for WanPipeline text-to-video checkpoints (Wan 2.1 T2V 1.3B/14B)."""

    pipeline: Any
    family: str = "wan"
    denoiser_name: str = "transformer"
    noise_process: str = "flow"
    micro_conditioning: bool = False
    causal: bool = True
    timestep_sampling: str = "uniform"  # or "logit_normal" (the DenseDPO paper's rectified-flow training)
    max_text_len: int = 512

    def __post_init__(self) -> None:
        if self.timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"timestep_sampling={self.timestep_sampling!r}: use uniform or logit_normal")
        cfg = dict(self.pipeline.scheduler.config)
        self.shift = float(cfg.get("flow_shift") or cfg.get("shift") or 1.0)
        self.scheduler = self.pipeline.scheduler  # sampling only; training maths are the flow formulas below
        self.vae = self.pipeline.vae
        self.temporal_compression = 2 ** sum(bool(d) for d in self.vae.config.temperal_downsample)
        tok_max = getattr(self.pipeline.tokenizer, "model_max_length", self.max_text_len) or self.max_text_len
        self.max_text_len = min(self.max_text_len, int(tok_max))
        z = self.vae.config.z_dim
        self.latents_mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32).view(
            1, z, 1, 1, 1
        )
        self.latents_std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.pipeline.text_encoder]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipeline.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_text_len,
            device=self.pipeline.text_encoder.device,
        )
        return {"encoder_hidden_states": embeds}

    @torch.no_grad()
    def latent_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [B,T,3,H,W] in [-1,1] (T = 4k+1) -> posterior mean and std [B,z,k+1,H/8,W/8] (unnormalised)."""
        dist = self.vae.encode(pixels.permute(0, 2, 1, 3, 4).to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def latents_from_moments(self, mean, std, generator=None) -> torch.Tensor:
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
        z = mean.float() + std.float() * eps
        return (z - self.latents_mean.to(z.device)) / self.latents_std.to(z.device)

    def encode_media(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents_from_moments(*self.latent_moments(pixels), generator)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B,z,T,h,w] -> videos [B,T',3,H,W] in [0,1]."""
        z = latents.float() * self.latents_std.to(latents.device) + self.latents_mean.to(latents.device)
        x = self.vae.decode(z.to(self.vae.dtype)).sample.float()
        return x.permute(0, 2, 1, 3, 4).add(1).div(2).clamp(0, 1)

    def extra_conditioning(self, meta: dict[str, Any], resolution: int) -> dict[str, torch.Tensor]:
        return {}

    def add_noise(self, x0, noise, t):
        sigma = expand_like(t.float() / NUM_TRAIN_TIMESTEPS, x0, torch.float32)
        return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)

    def target(self, x0, noise, t):
        return noise - x0

    def predict(self, denoiser, xt, t, cond):
        dtype = next(p.dtype for p in denoiser.parameters())
        return denoiser(
            hidden_states=xt.to(dtype),
            timestep=t,
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            return_dict=False,
        )[0]

    def sample_timesteps(self, n, generator, device):
        """t = 1000 * shift(u), u ~ U(0,1) or logit-normal(0,1)."""
        if self.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn(n, generator=generator))
        else:
            u = torch.rand(n, generator=generator)
        return (shift_sigmas(u, self.shift) * NUM_TRAIN_TIMESTEPS).to(device)
