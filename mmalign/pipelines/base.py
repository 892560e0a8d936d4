"""The adapter contract every diffusers family satisfies, and the scheduler maths they share.

An adapter hides what differs between families (how prompts and media are encoded, what extra
conditioning the denoiser takes, what it is trained to predict, which noise process it uses) behind one
stated Protocol, so a trainer's ``compute_loss`` and the loop read the same for SD1.5, SDXL and a video model::

    cond = adapter.encode_prompts(prompts)        # dict of tensors, cached per prompt
    x0 = adapter.encode_media(pixels)             # scaled latents [B,C,H,W] or [B,C,T,H,W]
    xt = adapter.add_noise(x0, noise, t)
    pred = adapter.predict(denoiser, xt, t, cond)
    loss = per_sample_mse(pred, adapter.target(x0, noise, t))

:class:`PipelineAdapter` lists every member a trainer, a data builder or the loop may use; a video family
also satisfies :class:`VideoAdapter`. Nothing outside an adapter asks which family it is: family knowledge
(SDXL's micro-conditioning, text-encoder names, the noise process) is a member here. Adding a family is one
adapter module plus one line in :data:`mmalign.pipelines.FAMILIES` (docs/adding_a_family.md).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import torch

from mmalign.utils import expand_like

NoiseProcess = Literal["ddpm", "flow"]


@runtime_checkable
class PipelineAdapter(Protocol):
    """What trainers, data builders and the loop need from a diffusers pipeline family."""

    family: str
    pipeline: Any  # the diffusers pipeline the adapter wraps
    denoiser_name: str  # pipeline attribute of the trained network: "unet" or "transformer"
    noise_process: (
        NoiseProcess  # "ddpm": x_t = sqrt(abar) x0 + sqrt(1-abar) eps, scheduler.alphas_cumprod exists
    )
    #                              (eps/v/sample prediction); "flow": x_t = (1-sigma) x0 + sigma eps, t = 1000 sigma
    scheduler: Any  # the training noise scheduler; for "ddpm": alphas_cumprod, config.prediction_type
    vae: Any  # the autoencoder (kept in fp32 by the loop)
    micro_conditioning: bool  # the denoiser takes each image's original size and crop (SDXL add_time_ids):
    #                           pair images are then cropped/flipped jointly and their crops recorded

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """Every frozen text encoder of the pipeline (the loop casts them to the compute dtype)."""

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning for a batch of prompts, one tensor per key, batch first."""

    def latent_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] -> the VAE posterior's (mean, std), unscaled; what the latent cache stores."""

    def latents_from_moments(
        self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A posterior sample, scaled (and shifted/normalised) as the family's denoiser expects."""

    def encode_media(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] ([B,3,H,W] or [B,T,3,H,W]) -> scaled latents, sampled from the VAE posterior."""

    def extra_conditioning(self, meta: dict[str, Any], resolution: int) -> dict[str, torch.Tensor]:
        """Per-item conditioning beyond text (SDXL: ``time_ids`` from ``original_size``/``crop_top_left``)."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward-noise clean latents to timestep ``t`` [B]."""

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict (from the scheduler's prediction type, or noise - x0 for flow)."""

    def predict(
        self, denoiser: torch.nn.Module, xt: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Run the denoiser on noisy latents with the conditioning of :meth:`encode_prompts`."""

    def sample_timesteps(
        self, n: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """Training timesteps [n]."""


@runtime_checkable
class VideoAdapter(PipelineAdapter, Protocol):
    """A video family: latents [B,C,T,H,W], and how latent frames map to pixel frames."""

    temporal_compression: int  # pixel frames per latent frame (1: none; CogVideoX/Wan: 4)
    causal: bool  # causal VAE: latent 0 <- frame 0, latent j <- frames c(j-1)+1 .. cj

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B,C,T,h,w] -> videos [B,T',3,H,W] in [0,1]."""


def is_video(adapter: PipelineAdapter) -> bool:
    """Whether ``adapter`` is a video family (satisfies :class:`VideoAdapter`)."""
    return isinstance(adapter, VideoAdapter)


# --------------------------------------------------------------------------------------------------
# Shared helpers (free functions, no base class)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dim, in fp32: [B,...] -> [B]."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def per_frame_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Video latents [B,C,T,H,W] -> error per latent frame [B,T] (mean over C, H, W), in fp32."""
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 3, 4))


def ddpm_add_noise(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, for any latent rank (diffusers' add_noise maths)."""
    abar = scheduler.alphas_cumprod.to(x0.device)[t.long()]
    return expand_like(abar.sqrt(), x0) * x0 + expand_like((1 - abar).sqrt(), x0) * noise


def ddpm_target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Target by ``scheduler.config.prediction_type``: epsilon -> noise, v_prediction -> velocity, sample -> x0."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        abar = scheduler.alphas_cumprod.to(x0.device)[t.long()]
        return expand_like(abar.sqrt(), x0) * noise - expand_like((1 - abar).sqrt(), x0) * x0
    if kind == "sample":
        return x0
    raise ValueError(
        f"unsupported prediction_type {kind!r} in the scheduler config (epsilon, v_prediction, sample)"
    )


def x0_and_eps(
    output: torch.Tensor, x: torch.Tensor, abar: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoiser output at a latent ``x`` of level ``abar`` [B] -> (x0_hat, eps), for any prediction type.

    The split of diffusers' DDIM schedulers: epsilon: x0 = (x - sqrt(1-abar) out) / sqrt(abar);
    v_prediction: x0 = sqrt(abar) x - sqrt(1-abar) out, eps = sqrt(abar) out + sqrt(1-abar) x; sample: x0 = out.
    """
    a = expand_like(abar, x)
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * output) / a.sqrt(), output
    if prediction_type == "sample":
        return output, (x - a.sqrt() * output) / (1 - a).sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * output, a.sqrt() * output + (1 - a).sqrt() * x
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon, sample, v_prediction)")


def x0_error_weight(adapter: PipelineAdapter, t: torch.Tensor) -> torch.Tensor:
    """Per-sample factor [B] turning a squared error in the denoiser's target space into one in x0 space.

    ddpm epsilon: (1 - abar) / abar = 1/SNR(t); v_prediction: 1 - abar; sample: 1; flow (target noise - x0,
    x_t = (1-sigma) x0 + sigma eps, t = 1000 sigma): sigma^2. Large at high noise, where a small error in the
    target moves the x0 estimate a lot, tiny at low noise.
    """
    if adapter.noise_process == "flow":
        return (t.float() / 1000.0) ** 2
    abar = adapter.scheduler.alphas_cumprod.to(t.device)[t.long()].float()
    kind = adapter.scheduler.config.prediction_type
    if kind == "epsilon":
        return (1 - abar) / abar
    if kind == "v_prediction":
        return 1 - abar
    if kind == "sample":
        return torch.ones_like(abar)
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon, sample, v_prediction)")


def guided_output(
    adapter: PipelineAdapter,
    denoiser: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor] | None,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance in diffusers' convention, ``u + g (c - u)``, as one batched call of [2B].

    ``g = 1`` runs the conditional branch alone and ``g = 0`` the unconditional one alone (one pass of [B]).
    Self-NPO's ``c + w (c - u)`` is ``g = 1 + w``.
    """
    if uncond is None or guidance_scale == 1.0:
        return adapter.predict(denoiser, x, t, cond)
    if guidance_scale == 0.0:
        return adapter.predict(denoiser, x, t, uncond)
    both = {k: torch.cat([uncond[k].to(cond[k].device), cond[k]]) for k in cond}
    out = adapter.predict(denoiser, torch.cat([x, x]), torch.cat([t, t]), both)
    u, c = out.float().chunk(2)
    return u + guidance_scale * (c - u)


def uniform_timesteps(
    scheduler: Any, n: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """t ~ U{0, ..., T-1}, as every Diffusion-DPO implementation draws them."""
    num = scheduler.config.num_train_timesteps
    return torch.randint(0, num, (n,), generator=generator, device="cpu").to(device)


def training_scheduler(scheduler_config: dict) -> Any:
    """A DDPMScheduler with the pipeline scheduler's beta schedule and prediction type.

    Sampling schedulers (Euler, DPM-Solver) share ``alphas_cumprod`` with DDPM for the same betas, so the
    training maths is the same whatever the pipeline samples with.
    """
    from diffusers import DDPMScheduler

    keys = (
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "prediction_type",
        "rescale_betas_zero_snr",
        "timestep_spacing",
        "steps_offset",
    )
    return DDPMScheduler.from_config({k: v for k, v in dict(scheduler_config).items() if k in keys})
