"""Self-NPO (Wang et al. 2025, arXiv 2505.11777) truncated diffusion fine-tuning, as pure tensor maths.

Self-NPO trains a *negative* model for classifier-free guidance without preference labels: an EMA teacher
takes a few DDIM steps to some x_t, its x0 estimate at x_t is the target, x_t is re-noised to a higher
level s > t and the student regresses the target from x_s. Conventions (match the released code,
G-U-N/Diffusion-NPO ``Self-NPO/train.py`` at 70061e3):

- VP notation: ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``, ``x_t = alpha_t x0 + sigma_t eps``.
- Re-noising (:func:`renoise`): ``x_s = (alpha_s/alpha_t) x_t + sqrt(sigma_s^2 - sigma_t^2 alpha_s^2/alpha_t^2) z``,
  which maps q(x_t | x0) onto q(x_s | x0) exactly (the forward process from t to s).
- Loss (:func:`pseudo_huber`): element-wise ``sqrt((pred - target)^2 + c^2) - c`` averaged over every
  non-batch dim (the diffusers LCM scripts' ``huber`` form the released code uses), c = 1e-3, in x0 space.
  No 0.5 factor; there is no beta (no preference term).
"""

from __future__ import annotations

import torch

from mmalign.utils import expand_like


def renoise(
    x_t: torch.Tensor,
    alpha_t: torch.Tensor | float,
    sigma_t: torch.Tensor | float,
    alpha_s: torch.Tensor | float,
    sigma_s: torch.Tensor | float,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Forward-diffuse ``x_t`` from level t to a higher level s (s > t).

    ``x_s = (alpha_s/alpha_t) x_t + sqrt(sigma_s^2 - sigma_t^2 alpha_s^2/alpha_t^2) noise``. If
    ``x_t ~ N(alpha_t x0, sigma_t^2)`` then ``x_s ~ N(alpha_s x0, sigma_s^2)``.

    Args:
        x_t: [B,...] latents at level t.
        alpha_t, sigma_t, alpha_s, sigma_s: [B] (or scalar) signal and noise scales.
        noise: [B,...] standard normal noise.

    Returns:
        [B,...] ``x_s`` in fp32.

    Raises:
        ValueError: if some s is not noisier than its t (negative variance).
    """
    x_t = x_t.float()
    ratio = expand_like(alpha_s, x_t, torch.float32) / expand_like(alpha_t, x_t, torch.float32)
    var = (
        expand_like(sigma_s, x_t, torch.float32) ** 2
        - expand_like(sigma_t, x_t, torch.float32) ** 2 * ratio**2
    )
    if (var < -1e-6).any():
        raise ValueError(
            "renoise needs s noisier than t (sigma_s/alpha_s >= sigma_t/alpha_t for every sample)"
        )
    return ratio * x_t + var.clamp_min(0).sqrt() * noise.float()


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    """Element-wise pseudo-Huber ``sqrt(d^2 + c^2) - c`` averaged over non-batch dims, in fp32: [B,...] -> [B].

    Quadratic (``d^2 / 2c``) for |d| << c, linear (``|d| - c``) for |d| >> c.
    """
    if c <= 0:
        raise ValueError(f"pseudo-Huber c={c} must be > 0")
    d = pred.float() - target.float()
    return ((d.pow(2) + c * c).sqrt() - c).flatten(1).mean(1)


def self_npo_loss(
    x0_student: torch.Tensor, x0_target: torch.Tensor, *, huber_c: float = 1e-3
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Self-NPO student loss: pseudo-Huber between the student's x0 estimate at (x_s, s) and the teacher's at x_t.

    Args:
        x0_student: [B,...] the student's x0 prediction (gradients flow through it).
        x0_target: [B,...] the EMA teacher's x0 estimate (no gradient).
        huber_c: pseudo-Huber c (released code: 1e-3).

    Returns:
        per-sample loss [B] and detached metrics ``x0_mse`` (mean squared x0 error) and ``huber``.
    """
    loss = pseudo_huber(x0_student, x0_target.detach(), huber_c)
    with torch.no_grad():
        metrics = {"x0_mse": (x0_student.float() - x0_target.float()).pow(2).mean(), "huber": loss.mean()}
    return loss, metrics
