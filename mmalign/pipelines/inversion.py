"""DDIM inversion (deterministic, or with InPO's small stochastic term) and DDIM sampling for any :class:`PipelineAdapter`.

Inversion walks a clean latent ``x_0`` up a K-step timestep grid ``t_1 < ... < t_K`` with the DDIM (eta = 0)
update, evaluating the (frozen) denoiser at the current, less noisy latent with the *next* timestep's label::

    out_k   = CFG(denoiser(x_{k-1}, t_k, cond), denoiser(x_{k-1}, t_k, uncond), guidance)
    eps_k, x0_hat = split(out_k, x_{k-1}, abar_{k-1})          # by the scheduler's prediction_type
    x_k     = sqrt(abar_k) * x0_hat + sqrt(1 - abar_k) * eps_k

with ``abar_0`` the start level: ``alphas_cumprod[0]`` (``set_alpha_to_one=False``, the SD/SDXL scheduler
configs and the Inversion-DPO code) or 1. This is the arithmetic of diffusers' ``DDIMInverseScheduler.step``
(Adapted from diffusers 0.42 DDIMInverseScheduler.step: same update, with the start and end levels passed
explicitly so any grid works) and of MIGHTYEZ/Inversion-DPO ``_next_step_scheduler``. :func:`ddim_sample`
runs the same update backwards (diffusers' ``DDIMScheduler.step`` with eta = 0), so ``ddim_sample(ddim_invert(x))``
reconstructs ``x`` up to the inversion error (the denoiser sees ``x_{k-1}`` when inverting and ``x_k`` when
sampling); the error is exactly zero when the prediction does not depend on which of the two it sees, e.g.
the exact x0-predictor of a point-mass data distribution.

Unconditional branch of the inverter's CFG: ``zero_conditioning`` (all-zero text embeddings, as the
Inversion-DPO code and SDXL's ``force_zeros_for_empty_prompt``) or the empty prompt's embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmalign.pipelines.base import PipelineAdapter, guided_output, x0_and_eps
from mmalign.utils import expand_like

# Conditioning keys that are not text embeddings: kept as they are in the "zero" unconditional branch.
NON_TEXT_KEYS = ("time_ids",)


def inversion_timesteps(
    num_train_timesteps: int, num_steps: int, *, spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """The ascending K-step grid ``t_1 < ... < t_K`` of diffusers' ``DDIMInverseScheduler.set_timesteps``.

    ``leading`` with offset 0 and K = 80 gives 0, 12, ..., 948 (the Inversion-DPO grid); ``trailing`` ends at
    ``num_train_timesteps - 1``.
    """
    from diffusers import DDIMInverseScheduler

    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} must be in [1, {num_train_timesteps}]")
    sched = DDIMInverseScheduler(
        num_train_timesteps=num_train_timesteps, timestep_spacing=spacing, steps_offset=steps_offset
    )
    sched.set_timesteps(num_steps)
    grid = sched.timesteps.long().clone()
    if grid.max() >= num_train_timesteps or grid.min() < 0:
        raise ValueError(f"grid {grid.tolist()} leaves [0, {num_train_timesteps}); lower steps_offset")
    return grid


def grid_alphas(scheduler: Any, timesteps: torch.Tensor, *, set_alpha_to_one: bool = False) -> torch.Tensor:
    """Noise levels ``abar`` of the grid, [K+1]: index 0 is the clean latent's level, index k is ``t_k``'s."""
    acp = scheduler.alphas_cumprod.float().cpu()
    start = torch.ones(1) if set_alpha_to_one else acp[:1]
    return torch.cat([start, acp[timesteps.long().cpu()]])


def inversion_noise_std(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """Std [K] of InPO's stochastic inversion term, before its ``eta``: one per grid step ``t_k``.

    InPO (JaydenLyh/InPO ``train.py``) adds ``eta * sqrt(var) * N(0, I)`` after the inverse step to ``t_k``, with
    ``var = DDIMScheduler._get_variance(t_k + T // N, t_k)``, the DDPM posterior variance between ``t_k`` and
    the next grid level: ``(1 - abar_{t_k}) / (1 - abar_next) * (1 - abar_next / abar_{t_k})``. The next
    level is clamped to ``T - 1`` (the released code indexes past the schedule after its last grid point).
    """
    acp = scheduler.alphas_cumprod.float().cpu()
    t = timesteps.long().cpu()
    num_train = len(acp)
    nxt = (t + num_train // len(t)).clamp_max(num_train - 1)
    a_t, a_next = acp[t], acp[nxt]
    return ((1 - a_t) / (1 - a_next) * (1 - a_next / a_t)).clamp_min(0).sqrt()


def zero_conditioning(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All-zero text embeddings (pooled ones included); micro-conditioning such as SDXL ``time_ids`` kept."""
    return {k: (v if k in NON_TEXT_KEYS else torch.zeros_like(v)) for k, v in cond.items()}


def ddim_step(
    x: torch.Tensor, eps: torch.Tensor, x0_hat: torch.Tensor, abar_to: torch.Tensor
) -> torch.Tensor:
    """DDIM (eta = 0) move of a latent to level ``abar_to`` [B]: ``sqrt(abar_to) x0_hat + sqrt(1 - abar_to) eps``."""
    a = expand_like(abar_to, x)
    return a.sqrt() * x0_hat + (1 - a).sqrt() * eps


@dataclass
class Inversion:
    """A batch of inverted trajectories.

    Attributes:
        latents: [B, K, ...] ``x_1 .. x_K`` (``x_k`` at level ``alphas[k]``, timestep ``timesteps[k-1]``).
        eps: [B, K, ...] the guided epsilon the inverter used for step k (computed at ``x_{k-1}``, label ``t_k``).
        timesteps: [K] the grid (only the first ``latents.shape[1]`` entries were run when stopped early).
        alphas: [K+1] the grid's levels, index 0 = the clean latent's.
    """

    latents: torch.Tensor
    eps: torch.Tensor
    timesteps: torch.Tensor
    alphas: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


@torch.no_grad()
def inverse_step(
    adapter: PipelineAdapter,
    denoiser: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    abar_from: torch.Tensor,
    abar_to: torch.Tensor,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor] | None,
    guidance_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM inverse step of ``x`` [B, ...] from level ``abar_from`` [B] to ``abar_to`` [B], the denoiser
    labelled with the target timesteps ``t`` [B]. Returns (the moved latent, the eps used), fp32."""
    out = guided_output(adapter, denoiser, x, t, cond, uncond, guidance_scale).float()
    x0_hat, eps = x0_and_eps(out, x, abar_from, adapter.scheduler.config.prediction_type)
    return ddim_step(x, eps, x0_hat, abar_to), eps


@torch.no_grad()
def ddim_invert(
    adapter: PipelineAdapter,
    denoiser: torch.nn.Module,
    x0: torch.Tensor,
    cond: dict[str, torch.Tensor],
    *,
    timesteps: torch.Tensor,
    guidance_scale: float = 1.0,
    uncond: dict[str, torch.Tensor] | None = None,
    set_alpha_to_one: bool = False,
    num_steps: int | None = None,
    eta: float = 0.0,
) -> Inversion:
    """Invert clean latents ``x0`` [B, ...] along ``timesteps`` (ascending, from :func:`inversion_timesteps`).

    Args:
        adapter: the pipeline adapter (its ``scheduler`` gives ``alphas_cumprod`` and ``prediction_type``).
        denoiser: the inverter (the frozen reference); run under no_grad.
        x0: scaled clean latents [B, C, H, W] (or [B, C, T, H, W]); the VAE posterior mean for a deterministic x0.
        cond: conditioning of :meth:`PipelineAdapter.encode_prompts` (+ extra conditioning), batch B.
        timesteps: [K] ascending grid.
        guidance_scale: CFG scale of the inverter (Inversion-DPO: 2); 1 = conditional only.
        uncond: unconditional conditioning for CFG; default :func:`zero_conditioning` of ``cond``.
        set_alpha_to_one: start level 1 instead of ``alphas_cumprod[0]``.
        num_steps: stop after this many steps (``x_{num_steps}``); default all K.
        eta: InPO's stochastic term: after step k add ``eta * inversion_noise_std(t_k) * N(0, I)``
            (InPO: 0.1); 0 = the deterministic DDIM inversion.

    Returns:
        :class:`Inversion` with the trajectory and the eps of every step, in fp32.
    """
    if uncond is None and guidance_scale != 1.0:
        uncond = zero_conditioning(cond)
    alphas = grid_alphas(adapter.scheduler, timesteps, set_alpha_to_one=set_alpha_to_one).to(x0.device)
    steps = len(timesteps) if num_steps is None else num_steps
    noise_std = eta * inversion_noise_std(adapter.scheduler, timesteps).to(x0.device) if eta else None
    b = x0.shape[0]
    x = x0.float()
    latents, eps_all = [], []
    for k in range(1, steps + 1):
        t = timesteps[k - 1].to(x0.device).expand(b)
        x, eps = inverse_step(
            adapter,
            denoiser,
            x,
            t,
            alphas[k - 1].expand(b),
            alphas[k].expand(b),
            cond,
            uncond,
            guidance_scale,
        )
        if noise_std is not None:
            x = x + noise_std[k - 1] * torch.randn_like(x)
        latents.append(x)
        eps_all.append(eps)
    return Inversion(torch.stack(latents, 1), torch.stack(eps_all, 1), timesteps.cpu(), alphas.cpu())


@torch.no_grad()
def ddim_sample(
    adapter: PipelineAdapter,
    denoiser: torch.nn.Module,
    xk: torch.Tensor,
    cond: dict[str, torch.Tensor],
    *,
    timesteps: torch.Tensor,
    guidance_scale: float = 1.0,
    uncond: dict[str, torch.Tensor] | None = None,
    set_alpha_to_one: bool = False,
    from_step: int | None = None,
) -> torch.Tensor:
    """Deterministic DDIM sampling from ``x_k`` (level of grid step ``from_step``, default K) back to the clean level.

    Adapted from diffusers 0.42 DDIMScheduler.step (eta = 0): the prediction at ``(x_k, t_k)`` moves ``x_k`` to
    level ``alphas[k-1]``. Returns the reconstructed clean latents [B, ...] (fp32).
    """
    if uncond is None and guidance_scale != 1.0:
        uncond = zero_conditioning(cond)
    alphas = grid_alphas(adapter.scheduler, timesteps, set_alpha_to_one=set_alpha_to_one).to(xk.device)
    kind = adapter.scheduler.config.prediction_type
    b = xk.shape[0]
    x = xk.float()
    for k in range(len(timesteps) if from_step is None else from_step, 0, -1):
        t = timesteps[k - 1].to(xk.device).expand(b)
        out = guided_output(adapter, denoiser, x, t, cond, uncond, guidance_scale).float()
        x0_hat, eps = x0_and_eps(out, x, alphas[k].expand(b), kind)
        x = ddim_step(x, eps, x0_hat, alphas[k - 1].expand(b))
    return x
