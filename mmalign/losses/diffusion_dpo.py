"""Diffusion-DPO loss (Wallace et al. 2023, arXiv 2311.12908) and its variants, as pure tensor maths."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo")
DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
LOG2 = math.log(2.0)


def preference_metrics(
    z: torch.Tensor,
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The diagnostics every preference loss logs (DESIGN §2), detached scalars.

    ``implicit_acc`` counts z > 0 as right and z == 0 as half right (so a LoRA at init, z = 0, reads 0.5).
    ``delta_w``/``delta_l`` (policy minus reference error) are logged separately: "both errors rise" shows
    as both deltas going positive while the margin still grows.
    """
    with torch.no_grad():
        return {
            "implicit_acc": ((z > 0).float() + 0.5 * (z == 0).float()).mean(),
            "reward_margin": z.mean(),
            "model_err_w": model_err_w.mean(),
            "model_err_l": model_err_l.mean(),
            "ref_err_w": ref_err_w.mean(),
            "ref_err_l": ref_err_l.mean(),
            "delta_w": (model_err_w - ref_err_w).mean(),
            "delta_l": (model_err_l - ref_err_l).mean(),
        }


def f_divergence_reward(
    delta: torch.Tensor, *, kappa: float, divergence: str, alpha: float = 0.5
) -> torch.Tensor:
    """``f'(u)`` of f-DPO (Wang et al. 2023, arXiv 2309.16240) transferred to diffusion, with ``log u = -kappa * delta``.

    ``delta`` = policy error - reference error. reverse_kl ``log u`` (Diffusion-DPO), forward_kl ``-1/u``,
    js ``log(2u / (1 + u))``, alpha ``(1 - u^-alpha) / alpha``. All have slope 1 in ``log u`` at u = 1 (js 1/2);
    forward KL and alpha are bounded above, which damps over-optimisation. ``kappa`` sets where that
    non-linearity starts (``|log u| ~ 1`` at ``|delta| ~ 1/kappa``); it is separate from beta, whose DPO scale
    (beta/2 = 2500) would put ``exp`` far past float range at any realistic error difference.
    """
    log_u = -kappa * delta
    if divergence == "reverse_kl":
        return log_u
    if divergence == "forward_kl":
        return -torch.exp(-log_u)
    if divergence == "js":
        return LOG2 + log_u - F.softplus(log_u)
    if divergence == "alpha":
        if alpha <= 0:
            raise ValueError(f"alpha-divergence needs alpha > 0, got {alpha}")
        return (1.0 - torch.exp(-alpha * log_u)) / alpha
    raise ValueError(f"unknown divergence {divergence!r}; choose from {DIVERGENCES}")


def diffusion_dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    sft_weight: float = 0.0,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
    kappa: float = 100.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO loss per pair.

    Conventions (canonical for mmalign, DESIGN §2)::

        delta_w = model_err_w - ref_err_w          # policy minus reference denoising error, winner
        delta_l = model_err_l - ref_err_l          # same for the loser
        z       = -(beta / 2) * (delta_w - delta_l)
        sigmoid: loss = -log sigmoid(z)            # paper eq. 14 with the supplement's 0.5 factor
        hinge:   loss = relu(1 - z)
        ipo:     loss = (z / tau - 1 / (2 tau))^2  # tau = beta / 2
        loss += sft_weight * model_err_w           # optional guard against likelihood displacement

    ``err`` is the per-sample *mean* squared error over all non-batch dims (the betas of the papers are
    calibrated for a mean, not a sum). Our ``beta`` equals the Salesforce ``--beta_dpo`` (5000) and
    diffusers' SDXL script ``--beta_dpo`` (5000); diffusers' SD1.5 script has no 0.5 factor, so its
    ``--beta_dpo 2500`` is our ``beta=5000`` (tau = 2500 = what diffusers' SD1.5 script calls beta).
    Descent lowers the winner's error relative to the reference and raises the loser's.

    Args:
        model_err_w, model_err_l: [B] policy errors on winner / loser (with grad).
        ref_err_w, ref_err_l: [B] reference errors (no grad).
        beta: KL strength (5000 SD1.5/SDXL in the paper's code, 2000 also used).
        loss_type: ``sigmoid`` | ``hinge`` | ``ipo``.
        sft_weight: lambda of the added winner error term (0 disables).
        divergence: f-DPO reward for the sigmoid loss: ``reverse_kl`` (= DPO), ``forward_kl``, ``js``, ``alpha``.
            Other than reverse_kl, ``z = (tau / kappa) (f'(u_w) - f'(u_l))`` with ``log u = -kappa * delta``: the
            same slope as DPO's ``z`` at delta = 0 (half for js), bounded where f' is.
        alpha: the alpha of the alpha-divergence.
        kappa: f-DPO only: ``log u = -kappa * delta`` (reverse_kl stays tied to beta).

    Returns:
        loss [B] and the metrics dict of :func:`preference_metrics` (z is the reward margin used).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {LOSS_TYPES}")
    if divergence != "reverse_kl" and loss_type != "sigmoid":
        raise ValueError(f"divergence={divergence!r} is defined for loss_type='sigmoid' only")
    tau = beta / 2.0
    delta_w = model_err_w - ref_err_w
    delta_l = model_err_l - ref_err_l
    if divergence == "reverse_kl":
        z = -tau * (delta_w - delta_l)
    else:
        if kappa <= 0:
            raise ValueError(f"kappa must be > 0, got {kappa}")
        reward_w = f_divergence_reward(delta_w, kappa=kappa, divergence=divergence, alpha=alpha)
        reward_l = f_divergence_reward(delta_l, kappa=kappa, divergence=divergence, alpha=alpha)
        z = (tau / kappa) * (reward_w - reward_l)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(z)
    elif loss_type == "hinge":
        loss = F.relu(1.0 - z)
    else:
        loss = (z / tau - 1.0 / (2.0 * tau)) ** 2
    if sft_weight:
        loss = loss + sft_weight * model_err_w
    return loss, preference_metrics(z, model_err_w, model_err_l, ref_err_w, ref_err_l)
