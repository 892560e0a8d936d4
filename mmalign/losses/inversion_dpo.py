"""Inversion-DPO losses (Li et al. 2025, arXiv 2507.11554; code MIGHTYEZ/Inversion-DPO @3e2af58), pure tensor maths.

Two modes (docs/inversion_dpo.md):

- ``inverted_noise`` (InPO-style, JaydenLyh/InPO): the noisy latent is the DDIM inversion ``x_t`` of the clean
  latent; :func:`implied_noise` turns it into the noise ``e~`` that the forward process would have needed, and
  the ordinary Diffusion-DPO loss (:func:`mmalign.losses.diffusion_dpo.diffusion_dpo_loss`, canonical beta,
  ``z = -(beta/2)(delta_w - delta_l)``) is applied with ``e~`` as the noise.
- ``trajectory`` (the released code): :func:`trajectory_dpo_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmalign.utils import expand_like


def implied_noise(xt: torch.Tensor, x0: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """``e~ = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``: the noise with ``add_noise(x0, e~, t) == x_t``.

    Args:
        xt: [B, ...] inverted latents at level ``abar`` [B]. x0: [B, ...] the clean latents they came from.
    """
    a = expand_like(abar.float(), xt)
    return (xt.float() - a.sqrt() * x0.float()) / (1 - a).sqrt()


def trajectory_weights(abar: torch.Tensor) -> torch.Tensor:
    """Per-step weight of the released code, ``w_k = (1 - abar_k) / (2 (1 - abar_k) abar_k) = 1 / (2 abar_k)``."""
    return 0.5 / abar.float()


def trajectory_dpo_loss(
    model_eps_w: torch.Tensor,
    model_eps_l: torch.Tensor,
    ref_eps_w: torch.Tensor,
    ref_eps_l: torch.Tensor,
    weights: torch.Tensor,
    *,
    beta: float,
    num_grid_steps: int,
    sign: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Inversion-DPO's loss along inverted trajectories, as MIGHTYEZ/Inversion-DPO ``train_ddim.py`` computes it.

    Conventions::

        d_k   = mean over C,H,W of (eps_theta_k - eps_ref_k)^2     # per step k of the subsample S (|S| = K)
        D     = (N / K) * sum_{k in S} w_k d_k                      # unbiased for sum over all N grid steps
        z     = sign * (beta / 2) * (D_w - D_l) / N                  # = sign * (beta/2) * mean_{k in S} w_k (d_w,k - d_l,k)
        loss  = -log sigmoid(z)

    With K = N this is the released code exactly (it sums all N = 80 steps, beta = 2000). ``sign = +1`` is the
    code: descent *raises* the winner's distance to the reference and keeps the loser's small. ``sign = -1`` is
    the likelihood derivation (Diffusion-DPO supplement S2, simplified line; the paper's figure): descent pulls
    the winner onto the reference trajectory and pushes the loser off; it is our canonical
    ``z = -(beta/2)(dtheta_w - dtheta_l)`` with ``dtheta = D / N``. Either way ``D`` and its gradient vanish when
    the policy equals the reference (a LoRA at init): the gradient is exactly zero there.

    Args:
        model_eps_w, model_eps_l: [B, K, ...] the policy's guided eps at the trajectory points (with grad).
        ref_eps_w, ref_eps_l: [B, K, ...] the reference's eps at the same points (the inverter's, no grad).
        weights: [B, K] ``w_k`` of each step (:func:`trajectory_weights`).
        beta: KL strength (the released launcher: 2000).
        num_grid_steps: N, the number of steps of the inversion grid.
        sign: +1 (released code) or -1 (derivation).

    Returns:
        loss [B] and metrics: implicit_acc (z > 0, z == 0 half), reward_margin (mean z), model_err_w/l = D/N,
        ref_err_w/l = 0 (the reference's distance to itself), delta_w/l = D/N, eps_diff_w/l (unweighted mean d).
    """
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 (released code) or -1 (derivation), got {sign}")
    k = weights.shape[1]
    d_w = (model_eps_w.float() - ref_eps_w.float()).pow(2).flatten(2).mean(2)  # [B, K]
    d_l = (model_eps_l.float() - ref_eps_l.float()).pow(2).flatten(2).mean(2)
    big_d_w = (weights * d_w).sum(1) * (num_grid_steps / k)
    big_d_l = (weights * d_l).sum(1) * (num_grid_steps / k)
    z = sign * 0.5 * beta * (big_d_w - big_d_l) / num_grid_steps
    loss = -F.logsigmoid(z)
    with torch.no_grad():
        zero = torch.zeros((), device=z.device)
        metrics = {
            "implicit_acc": ((z > 0).float() + 0.5 * (z == 0).float()).mean(),
            "reward_margin": z.mean(),
            "model_err_w": (big_d_w / num_grid_steps).mean(),
            "model_err_l": (big_d_l / num_grid_steps).mean(),
            "ref_err_w": zero,
            "ref_err_l": zero,
            "delta_w": (big_d_w / num_grid_steps).mean(),
            "delta_l": (big_d_l / num_grid_steps).mean(),
            "eps_diff_w": d_w.mean(),
            "eps_diff_l": d_l.mean(),
        }
    return loss, metrics
