"""Diffusion-DPO trainer (Wallace et al. 2023, arXiv 2311.12908): config + compute_loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmalign.config import ConfigError, _f, check_fields, short
from mmalign.losses.diffusion_dpo import DIVERGENCES, LOSS_TYPES, diffusion_dpo_loss
from mmalign.trainers.common import TrainModels, noised_pairs, pair_errors, repeat_cond


@dataclass
class DiffusionDPOConfig:
    name: str = _f("diffusion_dpo", "Method name.")
    beta: float = _f(
        5000.0,
        "KL strength; logit z = -(beta/2)(delta_w - delta_l). 5000 = SF/diffusers-SDXL --beta_dpo 5000 = diffusers-SD1.5 --beta_dpo 2500.",
        gt=0,
    )
    loss_type: str = _f("sigmoid", "sigmoid (DPO) | hinge | ipo.")
    sft_weight: float = _f(
        0.0,
        "Adds sft_weight x winner error (guards against likelihood displacement; 0 for strong bases such as SDXL).",
        ge=0,
    )
    divergence: str = _f(
        "reverse_kl", "f-DPO reward: reverse_kl (= DPO) | forward_kl | js | alpha (sigmoid loss only)."
    )
    alpha: float = _f(0.5, "alpha of the alpha-divergence.", gt=0)
    kappa: float = _f(
        100.0,
        "f-DPO only: log u = -kappa (policy err - ref err); |log u| ~ 1 at an error difference of 1/kappa. Reverse KL stays tied to beta.",
        gt=0,
    )
    independent_noise: bool = _f(
        False, "Draw separate noise for winner and loser (the papers share one draw)."
    )
    swap_pairs: bool = _f(
        False, "Train on (loser, winner): Diffusion-NPO's negative model (use it through NPO guidance)."
    )

    def __post_init__(self) -> None:
        check_fields(self, "method")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"method.loss_type={short(self.loss_type)}: choose from {LOSS_TYPES}")
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"method.divergence={short(self.divergence)}: choose from {DIVERGENCES}")
        if self.divergence != "reverse_kl" and self.loss_type != "sigmoid":
            raise ConfigError("method.divergence other than reverse_kl needs method.loss_type=sigmoid")
        if self.kappa <= 0:
            raise ConfigError(f"method.kappa={self.kappa} must be > 0 (default 100)")
        if self.beta <= 0:
            raise ConfigError(f"method.beta={self.beta} must be > 0 (typical: 2000-5000)")


def compute_loss(
    batch: dict, models: TrainModels, cfg: DiffusionDPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One Diffusion-DPO step on a batch of encoded pairs.

    Args:
        batch: ``latents_w``/``latents_l`` [B,C,H,W] scaled latents, ``cond`` dict of [B,...] conditioning.
        models: adapter, trained denoiser, reference access.
        cfg: the method config.
    """
    x_w, x_l = batch["latents_w"], batch["latents_l"]
    if cfg.swap_pairs:
        x_w, x_l = x_l, x_w
    pairs = noised_pairs(models.adapter, x_w, x_l, independent_noise=cfg.independent_noise)
    cond = repeat_cond(batch["cond"])
    m_w, m_l, r_w, r_l = pair_errors(models, pairs["xt"], pairs["t"], cond, pairs["target"])
    loss, metrics = diffusion_dpo_loss(
        m_w,
        m_l,
        r_w,
        r_l,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        sft_weight=cfg.sft_weight,
        divergence=cfg.divergence,
        alpha=cfg.alpha,
        kappa=cfg.kappa,
    )
    return loss.mean(), metrics
