"""DenseDPO trainer (Wu et al. 2025, arXiv 2506.03517): config, video pair data, compute_loss.

Video pairs with per-segment labels (:mod:`mmalign.data.segments`) are decoded, their VAE posterior
moments and prompt embeddings cached once, and each step draws one timestep and one noise for both clips,
computes per-latent-frame errors [B,T] (mean over C,H,W) for the policy and the reference, and applies
:func:`~mmalign.losses.dense_dpo.dense_dpo_loss` (``loss=dense``) or the whole-clip
:func:`~mmalign.losses.dense_dpo.video_dpo_loss` (``loss=vanilla``, the paper's VanillaDPO baseline on
the same pairs, labels = majority of the segments, clip ties dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmalign.config import ConfigError, _f
from mmalign.data.segments import (
    CachedVideoPairDataset,
    VideoLatentCache,
    VideoPairDataset,
    collate_video_pairs,
    keep_record,
    load_video_pairs,
)
from mmalign.data.setup import TrainData, cache_root, drop_captions
from mmalign.losses.dense_dpo import dense_dpo_loss, video_dpo_loss
from mmalign.pipelines import per_frame_mse
from mmalign.trainers.common import TrainModels, noised_pairs, repeat_cond

LOSSES = ("dense", "vanilla")


@dataclass
class DenseDPOConfig:
    name: str = _f("dense_dpo", "Method name.")
    beta: float = _f(500.0, "KL strength; per latent frame z_f = -(beta/2) l_f (dtheta_0,f - dtheta_1,f). Paper: 500, constant.")
    loss: str = _f("dense", "dense (per-latent-frame labels, ties masked) | vanilla (whole-clip DPO on the majority label).")
    segment_seconds: float = _f(1.0, "Segment length the labels refer to (paper: 1 s; 0.5 s equally good at 2x labelling cost).")
    min_non_tie: float = _f(0.2, "DenseDPO trains only on clips with more than this fraction of non-tie segments.")
    straddle: str = _f("tie", "A latent frame covering two segments: tie (DESIGN §3) | agree (kept if both segments agree).")
    num_frames: int | None = _f(None, "Frames per clip fed to the VAE (CogVideoX/Wan: 4k+1, e.g. 49 or 81); None = every sampled frame.")
    fps: float | None = _f(None, "Resample clips to this frame rate before taking num_frames (Wan 16, CogVideoX 8); None = native.")
    height: int | None = _f(None, "Frame height in pixels; None = model.resolution.")
    width: int | None = _f(None, "Frame width in pixels; None = model.resolution (Wan 2.1: 480x832).")
    independent_noise: bool = _f(False, "Separate noise per clip. The paper shares one noise (App. E) and notes shared seeds worsen App. B's effect.")
    video_backend: str | None = _f(None, "decord | pyav | torchcodec; None = first installed.")

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"method.loss={self.loss!r}: choose from {LOSSES}")
        if self.beta <= 0:
            raise ConfigError(f"method.beta={self.beta} must be > 0 (paper: 500)")
        if self.segment_seconds <= 0:
            raise ConfigError(f"method.segment_seconds={self.segment_seconds} must be > 0 (paper: 1.0)")
        if not 0 <= self.min_non_tie < 1:
            raise ConfigError(f"method.min_non_tie={self.min_non_tie} must be in [0, 1) (paper: 0.2)")
        if self.straddle not in ("tie", "agree"):
            raise ConfigError(f"method.straddle={self.straddle!r}: use tie or agree")
        if self.video_backend not in (None, "decord", "pyav", "torchcodec"):
            raise ConfigError(f"method.video_backend={self.video_backend!r}: use decord, pyav, torchcodec or leave it unset")
        for key in ("height", "width"):
            value = getattr(self, key)
            if value is not None and value % 8:
                raise ConfigError(f"method.{key}={value} must be a multiple of 8 (the video VAEs downsample by 8)")


def video_pair_data(cfg: Any, adapter: Any, accelerator: Any) -> TrainData:
    """Video pairs with segment labels -> cached moments + embeddings (or per-step encoding with data.cache=false)."""
    d, mcfg = cfg.data, cfg.method
    if not hasattr(adapter, "temporal_compression"):
        raise ConfigError(f"method.name=dense_dpo needs a video pipeline family; {adapter.family} is an image family")
    records = load_video_pairs(d.source, max_items=d.max_items)
    dense = mcfg.loss == "dense"
    kept = [r for r in records if keep_record(r, dense=dense, min_non_tie=mcfg.min_non_tie)]
    counts = {"rows": len(records), "dropped_few_labels": len(records) - len(kept)}
    if not kept:
        rule = f"more than {mcfg.min_non_tie:.0%} non-tie segments" if dense else "a non-tie majority label"
        raise ConfigError(f"{d.source}: none of the {len(records)} pairs has {rule}; nothing to train on")
    res = cfg.model.resolution
    decode = dict(height=mcfg.height or res, width=mcfg.width or res, fps=mcfg.fps, num_frames=mcfg.num_frames,
                  segment_seconds=mcfg.segment_seconds, compression=adapter.temporal_compression, causal=adapter.causal,
                  straddle=mcfg.straddle, backend=mcfg.video_backend)
    skip = d.on_bad_item == "skip"

    def prepare(raw: dict, device: torch.device) -> dict:
        return prepare_video_batch(raw, adapter, cache, d.caption_dropout, device)

    if not d.cache:
        cache = None
        dataset = VideoPairDataset(kept, decode, random_flip=d.random_flip, skip_bad=skip)
        return TrainData(dataset, collate_video_pairs, prepare, {**counts, "pairs": len(kept)})
    m = cfg.model
    fingerprint = {"model": m.pretrained, "revision": m.revision, "variant": m.variant, "family": adapter.family,
                   "vae_config": dict(adapter.vae.config), "random_flip": d.random_flip,
                   **{k: v for k, v in decode.items() if k != "backend"}}
    cache = VideoLatentCache(cache_root(cfg), fingerprint)
    if accelerator.is_main_process:
        ok, names, skipped = cache.build(kept, adapter, decode, random_flip=d.random_flip, skip_bad=skip,
                                         progress=cfg.train.progress)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        ok, names, skipped = cache.build(kept, adapter, decode, random_flip=d.random_flip, skip_bad=skip, progress=False)
    if not ok:
        raise ConfigError(f"{d.source}: every pair was skipped as unreadable; first problem: {skipped[:1]}")
    dataset = CachedVideoPairDataset(ok, names, cache, random_flip=d.random_flip)
    return TrainData(dataset, collate_video_pairs, prepare, {**counts, "pairs": len(ok), "skipped": len(skipped)}, skipped)


def prepare_video_batch(raw: dict, adapter: Any, cache: VideoLatentCache | None, caption_dropout: float,
                        device: torch.device) -> dict:
    """Raw batch -> ``latents_0``/``latents_1`` [B,C,T,H,W], ``labels`` [B,T], ``clip_label`` [B], ``cond``."""
    prompts = drop_captions(raw["prompt"], caption_dropout)
    if cache is None:
        cond = adapter.encode_prompts(prompts)
        mean_0, std_0 = adapter.latent_moments(raw["pixels_0"].to(device))
        mean_1, std_1 = adapter.latent_moments(raw["pixels_1"].to(device))
        if raw["labels"].shape[1] != mean_0.shape[2]:
            raise ValueError(f"{raw['item_id']}: {raw['labels'].shape[1]} latent labels for {mean_0.shape[2]} latent frames")
    else:
        from safetensors.torch import load_file

        rows = [load_file(str(cache.dir / cache.text_name(p))) for p in prompts]
        cond = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        mean_0, std_0, mean_1, std_1 = (raw[k].to(device) for k in ("mean_0", "std_0", "mean_1", "std_1"))
    return {"latents_0": adapter.latents_from_moments(mean_0, std_0), "latents_1": adapter.latents_from_moments(mean_1, std_1),
            "labels": raw["labels"].to(device), "clip_label": raw["clip_label"].to(device),
            "cond": {k: v.to(device) for k, v in cond.items()}, "prompts": prompts, "item_id": raw.get("item_id", [])}


def frame_errors(models: TrainModels, xt: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                 target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-latent-frame policy and reference errors on a stacked [2B] batch -> (m_0, m_1, r_0, r_1), each [B,T]."""
    adapter = models.adapter
    model_err = per_frame_mse(adapter.predict(models.denoiser, xt, t, cond), target)
    with models.reference() as ref:
        ref_err = per_frame_mse(adapter.predict(ref, xt, t, cond), target)
    m_0, m_1 = model_err.chunk(2)
    r_0, r_1 = ref_err.chunk(2)
    return m_0, m_1, r_0, r_1


def compute_loss(batch: dict, models: TrainModels, cfg: DenseDPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One DenseDPO (or whole-clip video DPO) step on a batch of encoded video pairs.

    Args:
        batch: ``latents_0``/``latents_1`` [B,C,T,H,W], ``labels`` [B,T] in {+1,0,-1} (+1: clip 0 better at
            that latent frame), ``clip_label`` [B], ``cond`` dict of [B,...] conditioning.
        models: adapter, trained denoiser, reference access.
        cfg: the method config.
    """
    pairs = noised_pairs(models.adapter, batch["latents_0"], batch["latents_1"], independent_noise=cfg.independent_noise)
    m_0, m_1, r_0, r_1 = frame_errors(models, pairs["xt"], pairs["t"], repeat_cond(batch["cond"]), pairs["target"])
    if cfg.loss == "dense":
        return dense_dpo_loss(m_0, m_1, r_0, r_1, batch["labels"], beta=cfg.beta)
    return video_dpo_loss(m_0, m_1, r_0, r_1, batch["clip_label"], beta=cfg.beta)
