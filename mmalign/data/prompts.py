"""Prompt-only training data (Self-NPO and other data-free methods): prompts, cached text embeddings, and
optionally one real image per prompt (Self-NPO's released-code start from a noised real latent).

``data.source`` is either a ``.txt`` file (one prompt per line, blank lines and ``#`` comments skipped) or a
JSONL/CSV manifest with a ``prompt`` (or ``caption``) column; an ``image`` column (path relative to the
manifest) is read only when the method asks for real images. Text embeddings of every prompt and of ``""``
go through :class:`~mmalign.data.cache.LatentCache`'s text cache when ``data.cache`` is on; image
posterior moments are encoded once at start-up and kept in memory (fine for the thousands of images
Self-NPO's 1000 steps need; not meant for a Pick-a-Pic-sized set).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmalign.config import DataConfig
from mmalign.data.images import DataError, open_image, resize_crop
from mmalign.data.setup import TrainData, drop_captions, image_cache_fingerprint
from mmalign.utils import TEXT_ENCODING


@dataclass
class PromptRecord:
    prompt: str
    row: str  # "prompts.txt:3", for error messages
    image: str | None = None


def load_prompts(
    source: str | Path, *, need_images: bool = False, max_items: int | None = None
) -> list[PromptRecord]:
    """Read prompts (and, with ``need_images``, image paths) from a .txt file or a JSONL/CSV manifest."""
    try:
        return _load_prompts(source, need_images=need_images, max_items=max_items)
    except UnicodeDecodeError as err:
        raise DataError(f"{source}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise DataError(f"{source}: not a valid CSV manifest: {err}") from None


def _load_prompts(source: str | Path, *, need_images: bool, max_items: int | None) -> list[PromptRecord]:
    path = Path(source)
    if not str(source):
        raise DataError(
            "data.source is empty: point it at a prompts .txt file or a JSONL/CSV manifest with a prompt column"
        )
    if not path.is_file():
        raise DataError(f"data.source not found: {path}")
    records: list[PromptRecord] = []
    if path.suffix == ".txt":
        if need_images:
            raise DataError(
                f"{path}: a .txt prompt list has no images; method.start=real needs a JSONL/CSV manifest "
                "with prompt and image columns (or use method.start=noise)"
            )
        for i, line in enumerate(path.read_text(encoding=TEXT_ENCODING).splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                records.append(PromptRecord(line.strip(), f"{path}:{i}"))
    elif path.suffix in (".jsonl", ".json", ".csv"):
        for where, row in _rows(path):
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object with a prompt column, got {type(row).__name__}")
            prompt = row.get("prompt", row.get("caption"))
            if prompt is None:
                raise DataError(f"{where}: missing column 'prompt' (or 'caption'); columns are {sorted(row)}")
            image = None
            if need_images:
                value = row.get("image")
                if not value:
                    raise DataError(
                        f"{where}: missing column 'image' (method.start=real needs one real image per prompt)"
                    )
                image = str(Path(value) if Path(value).is_absolute() else path.parent / value)
            records.append(PromptRecord(str(prompt), where, image))
    else:
        raise DataError(
            f"{path}: unknown prompt source type; use .txt (one prompt per line) or a .jsonl/.csv manifest"
        )
    if max_items is not None:
        records = records[:max_items]
    if not records:
        raise DataError(f"{path}: no prompts found")
    return records


def _rows(path: Path):
    if path.suffix == ".csv":
        with path.open(newline="", encoding=TEXT_ENCODING) as fh:
            for i, row in enumerate(csv.DictReader(fh), start=2):
                yield f"{path}:{i}", row
        return
    for i, line in enumerate(path.read_text(encoding=TEXT_ENCODING).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{i}", json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            raise DataError(f"{path}:{i}: not valid JSON: {str(err)[:200]}") from None


class PromptDataset(torch.utils.data.Dataset):
    """Items ``{prompt, item_id, original_size, crop_top_left}`` plus ``mean``/``std`` moments when images are used."""

    def __init__(
        self,
        records: list[PromptRecord],
        resolution: int,
        moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.records, self.resolution, self.moments = records, resolution, moments

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        item: dict[str, Any] = {
            "prompt": rec.prompt,
            "item_id": rec.row,
            "original_size": (self.resolution,) * 2,
            "crop_top_left": (0, 0),
        }
        if self.moments is not None:
            item["mean"], item["std"] = self.moments[0][i], self.moments[1][i]
        return item


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


@torch.no_grad()
def encode_image_moments(
    records: list[PromptRecord], adapter: Any, resolution: int, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std [N,C,h,w] of each record's image (centre crop), on CPU."""
    means, stds = [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        pix = torch.stack(
            [
                resize_crop(open_image(r.image, where=f"{r.row} (image: {r.image})"), resolution)[0]
                for r in chunk
            ]
        )
        mean, std = adapter.latent_moments(pix)
        means.append(mean.float().cpu())
        stds.append(std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def latent_shape(adapter: Any, resolution: int) -> tuple[int, int, int]:
    """(C, h, w) of the denoiser's latents for a square image of ``resolution`` pixels."""
    vae = adapter.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    denoiser = getattr(adapter.pipeline, adapter.denoiser_name)
    return int(denoiser.config.in_channels), resolution // factor, resolution // factor


def prompt_data(
    adapter: Any,
    accelerator: Any,
    data: DataConfig,
    *,
    resolution: int,
    cache_dir: Path,
    model_id: dict[str, Any],
    need_images: bool = False,
    progress: bool = True,
) -> TrainData:
    """Prompt-only data (real images too with ``need_images``, e.g. Self-NPO's ``start=real``).

    Batches from ``prepare``: ``cond`` and ``uncond`` (conditioning of the prompts and of ``""``, [B,...] each),
    ``latent_shape`` (C, h, w), ``prompts``, ``item_id`` and, with real images, ``latents`` [B,C,h,w].
    Arguments as :func:`mmalign.data.setup.image_pair_data`.
    """
    d, res = data, resolution
    records = load_prompts(d.source, need_images=need_images, max_items=d.max_items)
    moments = encode_image_moments(records, adapter, res, d.cache_batch_size) if need_images else None
    shape = latent_shape(adapter, res)
    cache = None
    if d.cache:
        from mmalign.data.cache import LatentCache

        cache = LatentCache(
            cache_dir, image_cache_fingerprint(model_id, adapter, resolution=res, random_crop=d.random_crop)
        )
        prompts = tuple(sorted({r.prompt for r in records} | {""}))
        if accelerator.is_main_process:
            cache.build(
                [], adapter, resolution=res, random_flip=False, prompts_extra=prompts, progress=progress
            )
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            cache.reload()

    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        if cache is None:
            return adapter.encode_prompts(prompts)
        rows = [cache.text(p) for p in prompts]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def prepare(raw: dict, device: torch.device) -> dict:
        prompts = drop_captions(raw["prompt"], d.caption_dropout)
        extra = adapter.extra_conditioning(raw, res)
        cond = {**encode(prompts), **extra}
        uncond = {**encode([""] * len(prompts)), **extra}
        batch = {
            "cond": {k: v.to(device) for k, v in cond.items()},
            "uncond": {k: v.to(device) for k, v in uncond.items()},
            "latent_shape": shape,
            "prompts": prompts,
            "item_id": raw.get("item_id", []),
        }
        if "mean" in raw:
            batch["latents"] = adapter.latents_from_moments(raw["mean"].to(device), raw["std"].to(device))
        return batch

    counts = {"prompts": len(records), "images": len(records) if need_images else 0}
    return TrainData(PromptDataset(records, res, moments), collate_prompts, prepare, counts)
