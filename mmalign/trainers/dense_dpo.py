"""DenseDPO trainer (Wu et al. 2025, arXiv 2506.03517): config + compute_loss.

Video pairs with per-segment labels (:mod:`mmalign.data.segments`, :mod:`mmalign.data.video_pairs`) are
decoded, their VAE posterior moments and prompt embeddings cached once, and each step draws one timestep and one noise for both clips,
computes per-latent-frame errors [B,T] (mean over C,H,W) for the policy and the reference, and applies
:func:`~mmalign.losses.dense_dpo.dense_dpo_loss` (``loss=dense``) or the whole-clip
:func:`~mmalign.losses.dense_dpo.video_dpo_loss` (``loss=vanilla``, the paper's VanillaDPO baseline on
the same pairs, labels = majority of the segments, clip ties dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmalign.config import ConfigError, _f, check_fields, short
from mmalign.data.segments import STRADDLE
from mmalign.losses.dense_dpo import dense_dpo_loss, video_dpo_loss
from mmalign.pipelines import per_frame_mse
from mmalign.pipelines.base import x0_error_weight
from mmalign.trainers.common import TrainModels, noised_pairs, pair_errors, repeat_cond

LOSSES = ("dense", "vanilla")


@dataclass
class DenseDPOConfig:
    name: str = _f("dense_dpo", "Method name.")
    beta: float = _f(
        500.0,
        "KL strength; per latent frame z_f = -(beta/2) l_f (dtheta_0,f - dtheta_1,f). Paper: 500, constant.",
        gt=0,
    )
    loss: str = _f(
        "dense",
        "dense (per-latent-frame labels, ties masked) | vanilla (whole-clip DPO on the majority label).",
    )
    segment_seconds: float = _f(
        1.0,
        "Segment length the labels refer to (paper: 1 s; 0.5 s equally good at 2x labelling cost).",
        le=3600,
    )
    sft_weight: float = _f(
        0.0,
        "Adds sft_weight x the preferred clip's error per latent frame (0 = the paper; see sft_ties). Kept colour on the toy bench, at a cost, see docs/dense_dpo.md.",
        ge=0,
    )
    sft_ties: bool = _f(
        True,
        "loss=dense: the sft term covers every frame, a tie frame with both clips' mean error (as vanilla's covers the whole preferred clip); false: only the non-tie frames, which measured worse on the toy bench.",
    )
    sft_x0_cap: float = _f(
        0.0,
        "> 0: weight each clip's sft term by min(x0 factor of its timestep, cap) (its error in x0 units), which puts it at high noise, where text-to-video sets layout and colour (0 = unweighted).",
        ge=0,
    )
    min_non_tie: float = _f(
        0.2, "DenseDPO trains only on clips with more than this fraction of non-tie segments."
    )
    straddle: str = _f(
        "majority",
        "A latent frame covering two segments: majority (the label of a strict majority of its frames, 2-2 splits tie) | tie (DESIGN §3; ties ~40% of a causal VAE's latents at 1 s segments) | agree (kept if its segments agree).",
    )
    num_frames: int | None = _f(
        None,
        "Frames per clip fed to the VAE (CogVideoX/Wan: 4k+1, e.g. 49 or 81); None = every sampled frame.",
        ge=1,
        le=4096,
    )
    fps: float | None = _f(
        None,
        "Resample clips to this frame rate before taking num_frames (Wan 16, CogVideoX 8); None = native.",
        gt=0,
        le=1000,
    )
    height: int | None = _f(None, "Frame height in pixels; None = model.resolution.", ge=8, le=8192)
    width: int | None = _f(
        None, "Frame width in pixels; None = model.resolution (Wan 2.1: 480x832).", ge=8, le=8192
    )
    independent_noise: bool = _f(
        False,
        "Separate noise per clip. The paper shares one noise (App. E) and notes shared seeds worsen App. B's effect.",
    )
    video_backend: str | None = _f(None, "decord | pyav | torchcodec; None = first installed.")

    def __post_init__(self) -> None:
        check_fields(self, "method")
        if self.loss not in LOSSES:
            raise ConfigError(f"method.loss={short(self.loss)}: choose from {LOSSES}")
        if self.beta <= 0:
            raise ConfigError(f"method.beta={self.beta} must be > 0 (paper: 500)")
        if self.segment_seconds <= 0:
            raise ConfigError(f"method.segment_seconds={self.segment_seconds} must be > 0 (paper: 1.0)")
        if not 0 <= self.min_non_tie < 1:
            raise ConfigError(f"method.min_non_tie={self.min_non_tie} must be in [0, 1) (paper: 0.2)")
        if self.straddle not in STRADDLE:
            raise ConfigError(f"method.straddle={short(self.straddle)}: use one of {STRADDLE}")
        if self.video_backend not in (None, "decord", "pyav", "torchcodec"):
            raise ConfigError(
                f"method.video_backend={short(self.video_backend)}: use decord, pyav, torchcodec or leave it unset"
            )
        for key in ("height", "width"):
            value = getattr(self, key)
            if value is not None and value % 8:
                raise ConfigError(
                    f"method.{key}={value} must be a multiple of 8 (the video VAEs downsample by 8)"
                )


def compute_loss(
    batch: dict, models: TrainModels, cfg: DenseDPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One DenseDPO (or whole-clip video DPO) step on a batch of encoded video pairs.

    Args:
        batch: ``latents_0``/``latents_1`` [B,C,T,H,W], ``labels`` [B,T] in {+1,0,-1} (+1: clip 0 better at
            that latent frame), ``clip_label`` [B], ``cond`` dict of [B,...] conditioning.
        models: adapter, trained denoiser, reference access.
        cfg: the method config.
    """
    pairs = noised_pairs(
        models.adapter, batch["latents_0"], batch["latents_1"], independent_noise=cfg.independent_noise
    )
    m_0, m_1, r_0, r_1 = pair_errors(  # [B,T]: errors per latent frame (mean over C,H,W)
        models, pairs["xt"], pairs["t"], repeat_cond(batch["cond"]), pairs["target"], error=per_frame_mse
    )
    sft = cfg.sft_weight
    if sft and cfg.sft_x0_cap > 0:  # [B]: the preferred clip's error in x0 units, capped
        sft = sft * x0_error_weight(models.adapter, pairs["t"][: m_0.shape[0]]).clamp(max=cfg.sft_x0_cap)
    kw = {"beta": cfg.beta, "sft_weight": sft}
    if cfg.loss == "dense":
        loss, metrics = dense_dpo_loss(m_0, m_1, r_0, r_1, batch["labels"], sft_ties=cfg.sft_ties, **kw)
    else:
        loss, metrics = video_dpo_loss(m_0, m_1, r_0, r_1, batch["clip_label"], **kw)
    return loss.mean(), metrics
