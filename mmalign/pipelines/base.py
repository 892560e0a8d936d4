"""The adapter protocol every diffusers family satisfies, and the scheduler maths they share.

An adapter hides what differs between families (how prompts and media are encoded, what extra
conditioning the denoiser takes, what it is trained to predict) behind five verbs, so a trainer's
``compute_loss`` reads the same for SD1.5, SDXL and a video model::

    cond = adapter.encode_prompts(prompts)        # dict of tensors, cached per prompt
    x0 = adapter.encode_media(pixels)             # scaled latents [B,C,H,W] or [B,C,T,H,W]
    xt = adapter.add_noise(x0, noise, t)
    pred = adapter.predict(denoiser, xt, t, cond)
    loss = per_sample_mse(pred, adapter.target(x0, noise, t))
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class PipelineAdapter(Protocol):
    """What a trainer needs from a diffusers pipeline family."""

    family: str
    scheduler: Any  # the training noise scheduler (DDPMScheduler-style: add_noise, get_velocity, alphas_cumprod)
    denoiser_name: str  # pipeline attribute of the trained network: "unet" or "transformer"

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning for a batch of prompts, one tensor per key, batch first."""

    def encode_media(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] ([B,3,H,W] or [B,T,3,H,W]) -> scaled latents, sampled from the VAE posterior."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward-noise clean latents to timestep ``t`` [B]."""

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict (from the scheduler's prediction type)."""

    def predict(self, denoiser: torch.nn.Module, xt: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the denoiser on noisy latents with the conditioning of :meth:`encode_prompts`."""

    def sample_timesteps(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """Training timesteps [n]."""


# --------------------------------------------------------------------------------------------------
# Shared helpers (free functions, no base class)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dim, in fp32: [B,...] -> [B]."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def per_frame_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Video latents [B,C,T,H,W] -> error per latent frame [B,T] (mean over C, H, W), in fp32."""
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 3, 4))


def _expand(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def ddpm_add_noise(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, for any latent rank (diffusers' add_noise maths)."""
    abar = scheduler.alphas_cumprod.to(x0.device)[t.long()]
    return _expand(abar.sqrt(), x0) * x0 + _expand((1 - abar).sqrt(), x0) * noise


def ddpm_target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Target by ``scheduler.config.prediction_type``: epsilon -> noise, v_prediction -> velocity, sample -> x0."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        abar = scheduler.alphas_cumprod.to(x0.device)[t.long()]
        return _expand(abar.sqrt(), x0) * noise - _expand((1 - abar).sqrt(), x0) * x0
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r} in the scheduler config (epsilon, v_prediction, sample)")


def uniform_timesteps(scheduler: Any, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """t ~ U{0, ..., T-1}, as every Diffusion-DPO implementation draws them."""
    num = scheduler.config.num_train_timesteps
    return torch.randint(0, num, (n,), generator=generator, device="cpu").to(device)


def training_scheduler(scheduler_config: dict) -> Any:
    """A DDPMScheduler with the pipeline scheduler's beta schedule and prediction type.

    Sampling schedulers (Euler, DPM-Solver) share ``alphas_cumprod`` with DDPM for the same betas, so the
    training maths is the same whatever the pipeline samples with.
    """
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "rescale_betas_zero_snr", "timestep_spacing", "steps_offset")
    return DDPMScheduler.from_config({k: v for k, v in dict(scheduler_config).items() if k in keys})
