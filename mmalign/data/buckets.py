"""Aspect-ratio buckets: train each pair at the (height, width) nearest its shape, with about one pixel area.

SDXL was trained on non-square buckets (about 1024^2 pixels each, sides in multiples of 64), and its
``add_time_ids`` record each image's original size, crop and target size. Cropping a 832x1216 photo to a
1024 square cuts off its top and bottom and teaches the model a crop it never sees at inference; bucketing,
as SDXL trainers do (kohya's sd-scripts, diffusers' SDXL scripts with bucketing), resizes each pair to
cover its bucket and crops only the excess.

- :func:`make_buckets` lists the buckets for a resolution: sides in multiples of ``step``, area at most
  ``resolution**2``, aspect ratio within ``max_ratio``;
- :func:`assign_buckets` reads each pair's winner header (no pixels are decoded) and picks the bucket with
  the nearest aspect ratio (in log space, so 2:1 and 1:2 are equally far from square);
- :class:`BucketBatchSampler` makes batches from one bucket each, seeded by (seed, epoch) so a resumed run
  sees the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from mmalign import limits
from mmalign.data.images import DataError
from mmalign.data.seeded import item_seed
from mmalign.limits import MediaError


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) buckets of at most ``resolution**2`` pixels, sides multiples of ``step``, ratio <= ``max_ratio``.

    For each width the height is the largest multiple of ``step`` that keeps the area within
    ``resolution**2``; the square ``(resolution, resolution)`` is always one of them (when ``step`` divides
    ``resolution``). 1024 px, step 64 gives SDXL's familiar list: 1024x1024, 896x1152, 832x1216, 768x1344, ...

    Raises:
        ValueError: ``step`` does not divide ``resolution`` or ``max_ratio < 1``.
    """
    if step <= 0 or resolution % step:
        raise ValueError(f"data.bucket_step={step} must divide model.resolution={resolution}")
    if max_ratio < 1:
        raise ValueError(f"data.bucket_max_ratio={max_ratio} must be >= 1")
    area = resolution * resolution
    buckets = set()
    for width in range(step, resolution * int(math.ceil(max_ratio)) + step, step):
        height = (area // width) // step * step
        if height < step:
            break
        for h, w in ((height, width), (width, height)):
            if max(h, w) / min(h, w) <= max_ratio + 1e-9:
                buckets.add((h, w))
    # keep the largest bucket of each shape: (768, 1280) is dropped for (768, 1344)
    kept = [b for b in buckets if not any(o != b and o[0] >= b[0] and o[1] >= b[1] for o in buckets)]
    return sorted(kept, key=lambda hw: hw[0] / hw[1])


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest ``height / width`` in log space."""
    ratio = math.log(height / width)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))


def image_size(source: Any, where: str) -> tuple[int, int]:
    """(height, width) from an image's header, within :mod:`mmalign.limits` (no pixel is decoded)."""
    try:
        with limits.decode_deadline(where):
            img = limits.open_image(source, where)
            return img.height, img.width
    except MediaError as err:
        raise DataError(str(err)) from None
    except Exception as err:  # PIL raises several types for data it cannot identify
        raise DataError(
            f"{where}: cannot read the image header: {type(err).__name__}: {str(err)[:200]}"
        ) from None


class BucketSizes(Sequence):
    """Per-record target size (height, width), stored as one small integer per record."""

    def __init__(self, buckets: Sequence[tuple[int, int]], index: np.ndarray):
        self.buckets, self.index = [tuple(b) for b in buckets], index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self.buckets[int(self.index[i])]


def assign_buckets(
    records: Sequence[Any],
    buckets: Sequence[tuple[int, int]],
    *,
    skip_bad: bool = False,
    progress: bool = True,
) -> BucketSizes:
    """The bucket of every pair, from its winner's header (the loser is resized to the winner's size, as SDXL's
    joint crop does). An unreadable header raises :class:`DataError` naming row and file; with ``skip_bad``
    the pair gets the square-most bucket and is reported as skipped when the loader decodes it."""
    from tqdm.auto import tqdm

    square = nearest_bucket(1, 1, buckets)
    index = np.full(len(records), square, dtype=np.int16)
    for i in tqdm(
        range(len(records)), desc="aspect-ratio buckets", disable=not progress or len(records) < 1000
    ):
        rec = records[i]
        try:
            h, w = image_size(rec.chosen, rec.where("chosen"))
        except DataError:
            if not skip_bad:
                raise
            continue
        index[i] = nearest_bucket(h, w, buckets)
    return BucketSizes(buckets, index)


def _hashable(g: Any) -> Any:
    return tuple(int(v) for v in g) if isinstance(g, (list, tuple, np.ndarray)) else int(g)


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of ``batch_size`` indices that all share one bucket; incomplete batches are dropped.

    With ``shuffle`` the indices of each bucket and then the order of the batches are shuffled with a
    generator seeded from ``(seed, epoch)`` (call :meth:`set_epoch`); without it, batches keep file order
    within each bucket and follow each batch's first index (a curriculum manifest stays easy-first).
    """

    def __init__(self, groups: Sequence[Any], batch_size: int, *, shuffle: bool = True, seed: int = 0):
        codes: dict[
            Any, int
        ] = {}  # any hashable group label (a bucket index, a (height, width)) -> 0, 1, ...
        self.groups = np.array([codes.setdefault(_hashable(g), len(codes)) for g in groups], dtype=np.int64)
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        gen = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, -1))
        batches = []
        for g in np.unique(self.groups):
            idx = np.flatnonzero(self.groups == g)
            if self.shuffle:
                idx = idx[torch.randperm(len(idx), generator=gen).numpy()]
            batches += [
                idx[s : s + self.batch_size].tolist()
                for s in range(0, len(idx) - self.batch_size + 1, self.batch_size)
            ]
        if self.shuffle:
            return [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]
        return sorted(batches, key=lambda b: b[0])

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        _, counts = np.unique(self.groups, return_counts=True)
        return int(sum(c // self.batch_size for c in counts))


__all__ = [
    "BucketBatchSampler",
    "BucketSizes",
    "assign_buckets",
    "image_size",
    "make_buckets",
    "nearest_bucket",
]
