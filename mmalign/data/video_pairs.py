"""Video preference pairs as training data: segment-labelled clips -> cached VAE moments and prompt embeddings
-> batches of ``latents_0``/``latents_1`` [B,C,T,H,W] with per-latent-frame labels [B,T] (DenseDPO)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmalign.config import ConfigError, DataConfig
from mmalign.data.segments import (
    CachedVideoPairDataset,
    VideoLatentCache,
    VideoPairDataset,
    collate_video_pairs,
    keep_record,
    load_video_pairs,
    non_tie_fraction,
)
from mmalign.data.setup import TrainData, drop_captions
from mmalign.pipelines import VideoAdapter, is_video


def video_pair_data(
    adapter: VideoAdapter,
    accelerator: Any,
    data: DataConfig,
    *,
    cache_dir: Path,
    model_id: dict[str, Any],
    dense: bool,
    min_non_tie: float,
    height: int,
    width: int,
    fps: float | None,
    num_frames: int | None,
    segment_seconds: float,
    straddle: str,
    video_backend: str | None,
    progress: bool = True,
) -> TrainData:
    """Video pairs with segment labels -> cached moments + embeddings (or per-step encoding with data.cache=false).

    Args:
        adapter: a video family's adapter (temporal compression, causal VAE).
        accelerator, data, cache_dir, model_id, progress: as :func:`mmalign.data.setup.image_pair_data`.
        dense: keep clips with more than ``min_non_tie`` non-tie segments (DenseDPO); else clips with a non-tie
            majority label (whole-clip video DPO).
        height, width, fps, num_frames: how clips are decoded (:func:`mmalign.data.segments.decode_pair`).
        segment_seconds, straddle: how segment labels map onto latent frames.
        video_backend: decord | pyav | torchcodec, or None for the first installed.
    """
    d = data
    if not is_video(adapter):
        raise ConfigError(f"video pairs need a video pipeline family; {adapter.family} is an image family")
    records = load_video_pairs(d.source, max_items=d.max_items)
    kept = [r for r in records if keep_record(r, dense=dense, min_non_tie=min_non_tie)]
    counts = {"rows": len(records), "dropped_few_labels": len(records) - len(kept)}
    if not kept:
        rule = f"more than {min_non_tie:.0%} non-tie segments" if dense else "a non-tie majority label"
        raise ConfigError(f"{d.source}: none of the {len(records)} pairs has {rule}; nothing to train on")
    decode = dict(
        height=height,
        width=width,
        fps=fps,
        num_frames=num_frames,
        segment_seconds=segment_seconds,
        compression=adapter.temporal_compression,
        causal=adapter.causal,
        straddle=straddle,
        backend=video_backend,
    )
    skip = d.on_bad_item == "skip"

    def prepare(raw: dict, device: torch.device) -> dict:
        return prepare_video_batch(raw, adapter, cache, d.caption_dropout, device)

    if not d.cache:
        cache = None
        dataset = VideoPairDataset(
            kept, decode, random_flip=d.random_flip, skip_bad=skip, min_non_tie=min_non_tie if dense else None
        )
        return TrainData(dataset, collate_video_pairs, prepare, {**counts, "pairs": len(kept)})
    fingerprint = {
        **{k: v for k, v in model_id.items() if k != "vae"},
        "random_flip": d.random_flip,
        **{k: v for k, v in decode.items() if k != "backend"},
    }
    cache = VideoLatentCache(cache_dir, fingerprint)
    if accelerator.is_main_process:
        ok, names, skipped = cache.build(
            kept, adapter, decode, random_flip=d.random_flip, skip_bad=skip, progress=progress
        )
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        ok, names, skipped = cache.build(
            kept, adapter, decode, random_flip=d.random_flip, skip_bad=skip, progress=False
        )
    if not ok:
        raise ConfigError(f"{d.source}: every pair was skipped as unreadable; first problem: {skipped[:1]}")
    if dense:  # the rule holds for the latent labels the loss sees, not only for the segment labels
        pairs = [(r, n) for r, n in zip(ok, names) if non_tie_fraction(cache.labels(n)) > min_non_tie]
        counts["dropped_few_latent_labels"] = len(ok) - len(pairs)
        if not pairs:
            raise ConfigError(
                f"{d.source}: no pair keeps more than {min_non_tie:.0%} labelled latent frames after mapping "
                f"segments onto latents (method.straddle={straddle}); nothing to train on"
            )
        ok, names = [r for r, _ in pairs], [n for _, n in pairs]
    dataset = CachedVideoPairDataset(ok, names, cache, random_flip=d.random_flip)
    return TrainData(
        dataset, collate_video_pairs, prepare, {**counts, "pairs": len(ok), "skipped": len(skipped)}, skipped
    )


def prepare_video_batch(
    raw: dict, adapter: Any, cache: VideoLatentCache | None, caption_dropout: float, device: torch.device
) -> dict:
    """Raw batch -> ``latents_0``/``latents_1`` [B,C,T,H,W], ``labels`` [B,T], ``clip_label`` [B], ``cond``."""
    prompts = drop_captions(raw["prompt"], caption_dropout)
    if cache is None:
        cond = adapter.encode_prompts(prompts)
        mean_0, std_0 = adapter.latent_moments(raw["pixels_0"].to(device))
        mean_1, std_1 = adapter.latent_moments(raw["pixels_1"].to(device))
        if raw["labels"].shape[1] != mean_0.shape[2]:
            raise ValueError(
                f"{raw['item_id']}: {raw['labels'].shape[1]} latent labels for {mean_0.shape[2]} latent frames"
            )
    else:
        from safetensors.torch import load_file

        rows = [load_file(str(cache.dir / cache.text_name(p))) for p in prompts]
        cond = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        mean_0, std_0, mean_1, std_1 = (raw[k].to(device) for k in ("mean_0", "std_0", "mean_1", "std_1"))
    return {
        "latents_0": adapter.latents_from_moments(mean_0, std_0),
        "latents_1": adapter.latents_from_moments(mean_1, std_1),
        "labels": raw["labels"].to(device),
        "clip_label": raw["clip_label"].to(device),
        "cond": {k: v.to(device) for k, v in cond.items()},
        "prompts": prompts,
        "item_id": raw.get("item_id", []),
    }
