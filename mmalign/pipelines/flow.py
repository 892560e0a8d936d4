"""Rectified-flow matching maths shared by the flow families (Wan, SD3): x_t = (1 - sigma) x0 + sigma noise,
target noise - x0, timestep t = 1000 sigma (float, in [0, 1000]), sigma = shift(u) with u uniform or logit-normal.

The ``shift`` is the pipeline scheduler's (FlowMatchEuler ``shift``, UniPC ``flow_shift``), so training draws its
timesteps from the distribution the sampler's schedule is built on (SD3 paper §3.1, "resolution-dependent
shifting"; diffusers' SD3 and Wan training scripts).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mmalign.utils import expand_like

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow schedules' timestep shift: sigma = shift u / (1 + (shift - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of :func:`shift_sigmas`: u = sigma / (shift - (shift - 1) sigma)."""
    return sigma / (shift - (shift - 1) * sigma)


def scheduler_shift(config: Mapping[str, Any]) -> float:
    """The static shift of a flow scheduler's config (UniPC ``flow_shift``, FlowMatchEuler ``shift``; 1: none)."""
    return float(config.get("flow_shift") or config.get("shift") or 1.0)


def check_sampling(timestep_sampling: str) -> None:
    if timestep_sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timestep_sampling={timestep_sampling!r}: use uniform or logit_normal")


def flow_add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma noise, sigma = t / 1000 (in fp32, returned in x0's dtype)."""
    sigma = expand_like(t.float() / NUM_TRAIN_TIMESTEPS, x0, torch.float32)
    return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)


def flow_timesteps(
    n: int,
    generator: torch.Generator | None,
    device: torch.device,
    *,
    shift: float,
    sampling: str,
    t_range: tuple[float, float] = (0.0, NUM_TRAIN_TIMESTEPS),
) -> torch.Tensor:
    """t = 1000 * shift(u), u ~ U(0,1) or logit-normal(0,1), [n] floats; conditioned on ``t_range`` when it is less
    than the full range (a Wan 2.2 expert's timesteps).

    A range [t0, t1) is drawn by inverting the shift and the CDF: u ~ U(u0, u1) (uniform), or
    u = sigmoid(ndtri(p)) with p ~ U(ndtr(logit u0), ndtr(logit u1)) (logit-normal), i.e. the full-range
    distribution conditioned on the range, with no rejection.
    """
    if t_range == (0.0, NUM_TRAIN_TIMESTEPS):
        if sampling == "logit_normal":
            u = torch.sigmoid(torch.randn(n, generator=generator))
        else:
            u = torch.rand(n, generator=generator)
        return (shift_sigmas(u, shift) * NUM_TRAIN_TIMESTEPS).to(device)
    lo, hi = (torch.tensor(t / NUM_TRAIN_TIMESTEPS, dtype=torch.float64) for t in t_range)
    u_lo, u_hi = unshift_sigmas(lo, shift), unshift_sigmas(hi, shift)
    r = torch.rand(n, generator=generator, dtype=torch.float64)
    if sampling == "logit_normal":
        p_lo, p_hi = (torch.special.ndtr(torch.logit(u)) for u in (u_lo, u_hi))
        u = torch.sigmoid(torch.special.ndtri(p_lo + (p_hi - p_lo) * r))
    else:
        u = u_lo + (u_hi - u_lo) * r
    return (shift_sigmas(u, shift) * NUM_TRAIN_TIMESTEPS).float().to(device)
