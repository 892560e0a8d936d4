"""Image pair training data: pair records -> (cached) dataset -> batches; what every data builder returns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign.config import ConfigError, DataConfig
from mmalign.data.cache import CachedPairDataset, LatentCache, LazyCachedPairDataset, collate_items
from mmalign.data.images import DataError
from mmalign.data.pairs import PairDataset, collate_pairs, load_pairs


@dataclass
class TrainData:
    """What the loop needs: a dataset, its collate function and ``prepare`` (raw batch -> model inputs)."""

    dataset: torch.utils.data.Dataset
    collate: Callable[[list], dict]
    prepare: Callable[[dict, torch.device], dict]
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    groups: Sequence[Any] | None = None  # per item: batches are drawn within one group (aspect-ratio bucket)
    # writes what a lazy cache holds only in memory (the loop calls it at checkpoints and at the run's end)
    flush: Callable[[], None] | None = None


def cache_root(cache_dir: str | None, output_dir: str | Path) -> Path:
    """``data.cache_dir``, or ``<output_dir>/../.mmalign_cache`` (shared by the runs beside it)."""
    return Path(cache_dir) if cache_dir else Path(output_dir).parent / ".mmalign_cache"


def model_fingerprint(
    adapter: Any,
    *,
    pretrained: str,
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
) -> dict[str, Any]:
    """What identifies the encoders a cache entry came from (the model, its VAE config, the family, and the dtype
    the text encoders run in: embeddings cached under fp16 are other numbers than under bf16 or fp32, and a batch
    that mixed them would not even stack under autocast)."""
    text_dtypes = sorted({str(p.dtype) for enc in adapter.text_encoders for p in enc.parameters()})
    return {
        "model": pretrained,
        "revision": revision,
        "variant": variant,
        "vae": vae,
        "family": adapter.family,
        "vae_config": dict(adapter.vae.config),
        "text_dtype": ",".join(text_dtypes),
    }


def image_cache_fingerprint(
    model_id: dict[str, Any], adapter: Any, *, resolution: int, random_crop: bool
) -> dict[str, Any]:
    return {
        **model_id,
        "resolution": resolution,
        "random_crop": random_crop,
        "joint_crop": adapter.micro_conditioning,
    }


def drop_captions(prompts: list[str], p: float) -> list[str]:
    """Replace each prompt by '' with probability ``p`` (the Salesforce code's caption dropout)."""
    if p <= 0:
        return list(prompts)
    keep = torch.rand(len(prompts)) >= p
    return [q if k else "" for q, k in zip(prompts, keep.tolist())]


def check_files(records: Sequence[Any]) -> None:
    """A DataError naming the row and file of the first pair whose image file is missing, empty or not a regular
    file (one ``stat`` per file; images given as bytes need none). Decoding is still checked when drawn."""
    from mmalign.limits import MediaError, check_media_file

    for r in records:
        for side in ("chosen", "rejected"):
            src = getattr(r, side)
            if isinstance(src, str):
                try:
                    check_media_file(src, where=r.where(side))
                except MediaError as err:
                    raise DataError(str(err)) from None


def image_pair_data(
    adapter: Any,
    accelerator: Any,
    data: DataConfig,
    *,
    resolution: int,
    cache_dir: Path,
    model_id: dict[str, Any],
    progress: bool = True,
    keep: Callable[[Any], bool] | None = None,
) -> TrainData:
    """Image preference pairs, from the latent/text cache when ``data.cache`` is on.

    Args:
        adapter: the pipeline adapter (encoders, micro-conditioning).
        accelerator: anything with ``is_main_process`` and ``wait_for_everyone()`` (the main process fills the cache).
        data: the data section (source, format, ties, flips/crops, caption dropout, cache switches).
        resolution: square training resolution in pixels.
        cache_dir: where the latent/text cache lives (:func:`cache_root`).
        model_id: :func:`model_fingerprint` of the encoders.
        progress: show a progress bar while the cache fills.
        keep: only records it accepts (e.g. personal_dpo: pairs whose user has a vector).
    """
    d, res = data, resolution
    records, counts = load_pairs(
        d.source, format=d.format, split=d.split, keep_ties=d.keep_ties, max_items=d.max_items
    )
    if keep is not None:
        records = [r for r in records if keep(r)]
        if not records:
            raise DataError(
                f"{d.source}: no pair passes this method's filter (e.g. no pair's user has a vector)"
            )
    skip = d.on_bad_item == "skip"
    joint = adapter.micro_conditioning
    sizes = None
    if d.buckets:
        from mmalign.data.buckets import assign_buckets, make_buckets

        try:
            buckets = make_buckets(res, d.bucket_step, d.bucket_max_ratio)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        sizes = assign_buckets(records, buckets, skip_bad=skip, progress=progress)
    if not skip and (not d.cache or d.cache_build == "lazy"):
        check_files(records)  # without an encoding pass, a missing file would stop the run when first drawn
    if not d.cache:
        dataset = PairDataset(
            records,
            res,
            random_flip=d.random_flip,
            random_crop=d.random_crop,
            joint_crop=joint,
            skip_bad=skip,
            sizes=sizes,
        )
        return TrainData(
            dataset,
            collate_pairs,
            lambda raw, device: prepare_pair_batch(raw, adapter, None, d.caption_dropout, res, device),
            counts,
            groups=None if sizes is None else sizes.index,
        )

    fingerprint = image_cache_fingerprint(model_id, adapter, resolution=res, random_crop=d.random_crop)
    if sizes is not None:
        fingerprint["buckets"] = [list(b) for b in sizes.buckets]
    cache = LatentCache(cache_dir, fingerprint)
    if d.cache_build == "lazy":
        from mmalign.data.cache import estimate_pair_bytes, format_bytes

        need = len(records) * estimate_pair_bytes(dict(adapter.vae.config), res, d.random_flip)
        if accelerator.is_main_process and progress:
            print(
                f"latent cache (lazy: encoded on first use): up to {format_bytes(need)} for {len(records)} pairs in {cache.dir}"
            )
        if d.cache_max_gb is not None and need > d.cache_max_gb * 1024**3:
            raise ValueError(
                f"the latent cache would grow to about {format_bytes(need)}, over data.cache_max_gb="
                f"{d.cache_max_gb:g}; raise it, set data.max_items, or use data.cache=false"
            )
        dataset = LazyCachedPairDataset(
            records,
            cache,
            resolution=res,
            random_flip=d.random_flip,
            random_crop=d.random_crop,
            joint_crop=joint,
            skip_bad=skip,
            sizes=sizes,
        )
        write = bool(accelerator.is_main_process)
        return TrainData(
            dataset,
            collate_items,
            lambda raw, device: prepare_lazy_batch(
                raw, adapter, cache, d.caption_dropout, res, device, random_flip=d.random_flip, write=write
            ),
            counts,
            groups=None if sizes is None else sizes.index,
            flush=cache.flush_lazy if write else None,
        )
    kwargs = dict(
        resolution=res,
        random_flip=d.random_flip,
        random_crop=d.random_crop,
        joint_crop=joint,
        batch_size=d.cache_batch_size,
        skip_bad=skip,
        progress=progress,
        max_bytes=None if d.cache_max_gb is None else d.cache_max_gb * 1024**3,
        sizes=sizes,
    )
    if accelerator.is_main_process:
        records_ok, keys, skipped = cache.build(records, adapter, **kwargs)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        cache.reload()
        records_ok, keys, skipped = cache.build(records, adapter, **kwargs, is_main_process=False)
    if not records_ok:
        raise DataError(f"{d.source}: every pair was skipped as unreadable; first problem: {skipped[:1]}")
    counts = {**counts, "pairs": len(records_ok), "skipped": len(skipped)}
    dataset = CachedPairDataset(records_ok, keys, cache, random_flip=d.random_flip)
    return TrainData(
        dataset,
        collate_pairs,
        lambda raw, device: prepare_pair_batch(raw, adapter, cache, d.caption_dropout, res, device),
        counts,
        skipped,
        groups=None if sizes is None else [r.extra["target_size"] for r in records_ok],
    )


def prepare_pair_batch(
    raw: dict,
    adapter: Any,
    cache: LatentCache | None,
    caption_dropout: float,
    resolution: int,
    device: torch.device,
) -> dict:
    """Raw pair batch (pixels or cached moments) -> ``latents_w``, ``latents_l``, ``cond`` on ``device``.

    The cached and uncached paths draw random numbers in the same order (caption dropout, then the winner's
    and the loser's posterior samples), so with the same seed they give the same batch.
    """
    prompts = drop_captions(raw["prompt"], caption_dropout)
    if cache is None:
        cond = adapter.encode_prompts(prompts)
        mean_w, std_w = adapter.latent_moments(raw["pixels_w"].to(device))
        mean_l, std_l = adapter.latent_moments(raw["pixels_l"].to(device))
    else:
        rows = [cache.text(p) for p in prompts]
        cond = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        mean_w, std_w, mean_l, std_l = (raw[k].to(device) for k in ("mean_w", "std_w", "mean_l", "std_l"))
    latents_w = adapter.latents_from_moments(mean_w, std_w)
    latents_l = adapter.latents_from_moments(mean_l, std_l)
    cond.update(adapter.extra_conditioning(raw, resolution))
    return {
        "latents_w": latents_w,
        "latents_l": latents_l,
        "cond": {k: v.to(device) for k, v in cond.items()},
        "prompts": prompts,
        "item_id": raw.get("item_id", []),
    }


def prepare_lazy_batch(
    raw: dict,
    adapter: Any,
    cache: LatentCache,
    caption_dropout: float,
    resolution: int,
    device: torch.device,
    *,
    random_flip: bool = True,
    write: bool = True,
) -> dict:
    """A ``data.cache_build=lazy`` batch -> model inputs, encoding (and caching) what the cache does not hold yet.

    Items that arrive as pixels are encoded here on ``device`` (both flips when flipping is on, as the eager build
    stores them) and added to the cache; prompts missing from the text cache are encoded and added too. Random
    numbers are drawn in the same order as :func:`prepare_pair_batch` (caption dropout, then the winner's and
    the loser's posterior samples), so a lazy batch equals the eager-cache batch of the same items and seed.
    Only the process with ``write`` stores shards.
    """
    items = raw["items"]
    prompts = drop_captions(raw["prompt"], caption_dropout)
    cache.encode_missing_text(prompts, adapter, write=write)
    rows = [cache.text(p) for p in prompts]
    cond = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    fresh = [it for it in items if "pixels_w" in it and not cache.has_pair(it["key"])]
    if fresh:
        n = len(fresh)
        pix = torch.cat(
            [torch.stack([it["pixels_w"] for it in fresh]), torch.stack([it["pixels_l"] for it in fresh])]
        )
        tensors: dict[str, torch.Tensor] = {}
        for suffix, x in ({"": pix, "f": pix.flip(-1)} if random_flip else {"": pix}).items():
            mean, std = adapter.latent_moments(x.to(device))
            mean, std = mean.detach().cpu(), std.detach().cpu()
            for i, it in enumerate(fresh):
                k = it["key"]
                tensors[f"{k}.w{suffix}.mean"], tensors[f"{k}.w{suffix}.std"] = mean[i], std[i]
                tensors[f"{k}.l{suffix}.mean"], tensors[f"{k}.l{suffix}.std"] = mean[n + i], std[n + i]
        for it in fresh:
            tensors[f"{it['key']}.meta"] = torch.tensor(
                [*it["original_size"], *it["crop_top_left"], *it["target_size"]], dtype=torch.int64
            )
        cache.add_pair_moments(tensors, list(dict.fromkeys(it["key"] for it in fresh)), write=write)
    moments = [it if "mean_w" in it else cache.pair(it["key"], flip=it["flip"]) for it in items]
    mean_w, std_w, mean_l, std_l = (
        torch.stack([m[k] for m in moments]).to(device) for k in ("mean_w", "std_w", "mean_l", "std_l")
    )
    latents_w = adapter.latents_from_moments(mean_w, std_w)
    latents_l = adapter.latents_from_moments(mean_l, std_l)
    # SDXL micro-conditioning from the cache entry (a flipped item's crop is mirrored there, as in the eager path)
    meta = {
        "original_size": [m["original_size"] for m in moments],
        "crop_top_left": [m["crop_top_left"] for m in moments],
        "target_size": [m["target_size"] for m in moments],
    }
    cond.update(adapter.extra_conditioning(meta, resolution))
    return {
        "latents_w": latents_w,
        "latents_l": latents_l,
        "cond": {k: v.to(device) for k, v in cond.items()},
        "prompts": prompts,
        "item_id": raw.get("item_id", []),
    }
