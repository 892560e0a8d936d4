"""Preference pair data: manifests (JSONL/CSV), Pick-a-Pic v2 parquet / datasets directories and hub datasets.

Every source becomes a sequence of :class:`PairRecord` with the winner first. A manifest is a small Python
list of paths. Pick-a-Pic-layout data (parquet files, a ``save_to_disk`` directory, or a hub id such as
``yuvalkirstain/pickapic_v2`` read with ``datasets.load_dataset``) stays in the memory-mapped Arrow dataset:
:class:`ArrowPairRecords` keeps only the indices of the usable rows (ties dropped) and reads a row's JPEG bytes
when that record is indexed, in whichever DataLoader worker asks. Resident memory therefore does not grow with
the number of pairs (``bench/bench_pickapic_memory.py``); a 335 GB Pick-a-Pic is never loaded at once.
(``load_dataset`` on parquet files writes one Arrow copy into the datasets cache, as for any hub dataset.)
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign.data.images import DataError, mirror_crop, open_image, resize_crop
from mmalign.utils import TEXT_ENCODING, first_line


@dataclass
class PairRecord:
    """One preference pair: ``chosen`` is the preferred image (path or encoded bytes)."""

    prompt: str
    chosen: str | bytes
    rejected: str | bytes
    row: str  # "manifest.jsonl:12" — where the pair came from, for error messages
    label_0: float = 1.0
    user_id: Any = None
    extra: dict = field(default_factory=dict)

    def where(self, which: str) -> str:
        src = getattr(self, which)
        return f"{self.row} ({which}: {src if isinstance(src, str) else f'<{len(src)} bytes>'})"


def _from_row(row: dict, where: str, base: Path | None, keep_ties: bool) -> PairRecord | None:
    def path(key: str) -> str | bytes:
        value = row.get(key)
        if value is None or value == "":
            raise DataError(f"{where}: missing column '{key}'")
        # a datasets Image feature: {"bytes": ..., "path": ...}, the bytes or (bytes None) a file's path
        if isinstance(value, dict) and "bytes" in value:
            if value["bytes"] is not None:
                return value["bytes"]
            value = value.get("path")
            if not value:
                raise DataError(f"{where}: column '{key}' is an image with neither bytes nor a path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, (dict, list, bool)):
            raise DataError(f"{where}: column '{key}' must be a file path, got {type(value).__name__}")
        p = Path(str(value))
        return str(p if p.is_absolute() or base is None else base / p)

    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected an object with prompt/chosen/rejected columns, got {type(row).__name__}"
        )
    prompt = row.get("prompt", row.get("caption"))
    if prompt is None and ("prompt" in row or "caption" in row):
        raise DataError(f"{where}: the {'prompt' if 'prompt' in row else 'caption'} is empty (null)")
    if prompt is None:
        raise DataError(
            f"{where}: missing column 'prompt' (or 'caption'); columns are {sorted(map(str, row))[:20]}"
        )
    if isinstance(prompt, (dict, list, bytes)):
        raise DataError(f"{where}: the prompt must be text, got {type(prompt).__name__}")
    user_id = row.get("user_id", row.get("user"))  # Pick-a-Pic: user_id; our manifests: user
    if "chosen" in row or "rejected" in row:
        return PairRecord(str(prompt), path("chosen"), path("rejected"), where, 1.0, user_id)
    img0_key = "image_0" if "image_0" in row else "jpg_0"
    img1_key = "image_1" if "image_1" in row else "jpg_1"
    if img0_key not in row or "label_0" not in row:
        raise DataError(
            f"{where}: expected columns prompt,chosen,rejected or prompt,image_0,image_1,label_0 "
            f"(or Pick-a-Pic's caption,jpg_0,jpg_1,label_0); got {sorted(row)}"
        )
    try:
        label = float(row["label_0"])
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: label_0={row['label_0']!r} is not a number in {{0, 0.5, 1}}") from err
    if label not in (0.0, 0.5, 1.0):
        raise DataError(f"{where}: label_0={label} must be 0, 0.5 or 1")
    if label == 0.5 and not keep_ties:
        return None
    first, second = path(img0_key), path(img1_key)
    chosen, rejected = (first, second) if label >= 0.5 else (second, first)
    return PairRecord(str(prompt), chosen, rejected, where, label, user_id)


def _iter_manifest(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of a JSONL/CSV manifest; a file that is not UTF-8 text or not a regular file is a DataError."""
    try:
        if not path.is_file():
            raise DataError(f"{path}: the manifest is not a regular file")
        yield from _iter_manifest_rows(path)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: the manifest is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    except csv.Error as err:
        raise DataError(f"{path}: not a valid CSV manifest: {err}") from None


def _iter_manifest_rows(path: Path) -> Iterator[tuple[str, dict]]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding=TEXT_ENCODING) as fh:
            for i, row in enumerate(csv.DictReader(fh), start=2):  # header is line 1
                yield f"{path}:{i}", row
        return
    with path.open(encoding=TEXT_ENCODING) as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:
                raise DataError(f"{path}:{i}: not valid JSON: {str(err)[:200]}") from None
            yield f"{path}:{i}", row


def is_hub_id(source: str) -> bool:
    """``owner/name`` (optionally with ``:config``) that is not a local path: a hub dataset id."""
    parts = str(source).split(":")[0].split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not Path(source).exists()
        and not str(source).startswith((".", "/"))
    )


def open_pickapic(source: str | Path, split: str = "train"):
    """The Pick-a-Pic-layout ``datasets.Dataset`` (memory-mapped Arrow) of parquet files, a ``save_to_disk``
    directory, or a hub id (``owner/name`` or ``owner/name:config``; ``split`` may be a slice such as
    ``train[:1000]``)."""
    import datasets

    if isinstance(source, str) and is_hub_id(source):
        name, _, config = source.partition(":")
        try:
            return datasets.load_dataset(name, config or None, split=split)
        except Exception as err:  # network, auth, unknown split: many types
            raise DataError(
                f"data.source={source}: cannot load the hub dataset (split {split!r}): "
                f"{type(err).__name__}: {first_line(err, 200)}"
            ) from None
    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split '{split}' (has {list(ds)}); set data.split")
            ds = ds[split]
        return ds
    files = sorted(map(str, path.glob("**/*.parquet"))) if path.is_dir() else [str(path)]
    if not files:
        raise DataError(f"{path}: no parquet files found")
    try:
        return datasets.load_dataset("parquet", data_files=files, split="train")
    except Exception as err:  # pyarrow's ArrowInvalid for a file that is not parquet, and others
        raise DataError(
            f"data.source={path}: cannot read it as Pick-a-Pic parquet data "
            f"({type(err).__name__}: {first_line(err, 200)})"
        ) from None


class ArrowPairRecords(Sequence):
    """Pair records read on demand from a memory-mapped Arrow dataset (Pick-a-Pic layout).

    Only an int64 index of the usable rows lives in Python; ``records[i]`` reads row ``index[i]`` (prompt, both
    images' bytes, label) from the Arrow table. Picklable, so DataLoader workers each read their own rows.

    Args:
        ds: A ``datasets.Dataset`` with caption/prompt, jpg_0/image_0, jpg_1/image_1 and label_0 columns.
        where: Source name used in error messages (``<where>[row]``).
        keep_ties: Keep label_0 == 0.5 rows.
        max_items: Use at most this many usable rows.
    """

    def __init__(self, ds: Any, where: str, *, keep_ties: bool = False, max_items: int | None = None):
        import numpy as np

        columns = set(ds.column_names)
        prompt = "caption" if "caption" in columns else "prompt"
        need = [{"caption", "prompt"}, {"jpg_0", "image_0"}, {"jpg_1", "image_1"}, {"label_0"}]
        missing = [" or ".join(sorted(c)) for c in need if not c & columns]
        if missing:
            raise DataError(f"{where}: missing column(s) {missing}; columns are {sorted(columns)}")
        labels = np.asarray(ds.select_columns(["label_0"]).with_format("numpy")["label_0"], dtype=np.float64)
        bad = np.flatnonzero(~np.isin(labels, (0.0, 0.5, 1.0)))
        if len(bad):
            raise DataError(f"{where}[{int(bad[0])}]: label_0={labels[bad[0]]} must be 0, 0.5 or 1")
        keep = np.arange(len(labels)) if keep_ties else np.flatnonzero(labels != 0.5)
        self.counts = {
            "rows": len(labels),
            "ties_dropped": int(len(labels) - len(keep)) if not keep_ties else 0,
        }
        if max_items is not None:
            keep = keep[:max_items]
        self.index = keep.astype(np.int64)
        self.where = where
        self.columns = [
            c
            for c in (
                prompt,
                "jpg_0" if "jpg_0" in columns else "image_0",
                "jpg_1" if "jpg_1" in columns else "image_1",
                "label_0",
                "user_id",
            )
            if c in columns
        ]
        import datasets

        ds = ds.select_columns(self.columns)
        for col in self.columns[1:3]:  # an Image feature would decode to PIL: keep the encoded bytes instead
            if isinstance(ds.features[col], datasets.Image):
                ds = ds.cast_column(col, datasets.Image(decode=False))
        self.ds = ds

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> PairRecord:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row_id = int(self.index[i])
        row = self.ds[row_id]
        rec = _from_row(row, f"{self.where}[{row_id}]", None, keep_ties=True)
        assert rec is not None
        return rec


def load_pairs(
    source: str | Path,
    *,
    format: str = "auto",
    split: str = "train",
    keep_ties: bool = False,
    max_items: int | None = None,
) -> tuple[Sequence[PairRecord], dict[str, int]]:
    """Read pair records from a manifest, Pick-a-Pic-style data or a hub dataset id.

    Returns:
        records (winner first; a list for manifests, an :class:`ArrowPairRecords` view for Arrow data) and counts
        ``{"rows": n, "ties_dropped": n}``.
    """
    if not str(source):
        raise DataError(
            "data.source is empty: point it at a manifest (.jsonl/.csv), Pick-a-Pic parquet data or a hub id"
        )
    path = Path(source)
    hub = isinstance(source, str) and is_hub_id(source)
    if not hub and not path.exists():
        raise DataError(f"data.source not found: {path}")
    if not hub and not (path.is_file() or path.is_dir()):
        raise DataError(f"data.source {path}: not a regular file or folder (a device, FIFO or socket)")
    if format == "auto":
        format = "manifest" if path.suffix in (".jsonl", ".json", ".csv") else "pickapic"
    if format == "pickapic" and path.is_file() and path.suffix in (".jsonl", ".json", ".csv"):
        raise DataError(
            f"data.source={path} is a {path.suffix} manifest but data.format=pickapic (parquet, a save_to_disk "
            "folder or a hub id; a recipe for Pick-a-Pic sets it): set data.format=manifest or auto"
        )
    if format == "pickapic":
        records = ArrowPairRecords(
            open_pickapic(source, split), str(source), keep_ties=keep_ties, max_items=max_items
        )
        if not len(records):
            raise DataError(
                f"{source}: no usable pairs ({records.counts['rows']} rows, "
                f"{records.counts['ties_dropped']} ties dropped)"
            )
        return records, dict(records.counts)
    out, counts = [], {"rows": 0, "ties_dropped": 0}
    for where, row in _iter_manifest(path):
        counts["rows"] += 1
        rec = _from_row(row, where, path.parent, keep_ties)
        if rec is None:
            counts["ties_dropped"] += 1
            continue
        out.append(rec)
        if max_items is not None and len(out) >= max_items:
            break
    if not out:
        raise DataError(
            f"{path}: no usable pairs ({counts['rows']} rows, {counts['ties_dropped']} ties dropped)"
        )
    return out, counts


def decode_pair(
    rec: PairRecord,
    size: int | tuple[int, int],
    *,
    random_crop: bool = False,
    joint_crop: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Decode and transform both images of a pair: pixels [3,H,W] in [-1, 1] plus SDXL crop metadata.

    ``size`` is the square resolution or the pair's (height, width) bucket. ``joint_crop`` (SDXL, as
    diffusers) first resizes the rejected image to the chosen one's size so both get the same crop.
    """
    img_w = open_image(rec.chosen, where=rec.where("chosen"))
    img_l = open_image(rec.rejected, where=rec.where("rejected"))
    if joint_crop and img_l.size != img_w.size:
        img_l = img_l.resize(img_w.size)
    state = generator.get_state() if (generator is not None and joint_crop) else None
    pix_w, orig, crop = resize_crop(img_w, size, random_crop=random_crop, generator=generator)
    if state is not None:
        generator.set_state(state)
    pix_l, _, _ = resize_crop(img_l, size, random_crop=random_crop, generator=generator)
    target = tuple(pix_w.shape[-2:])
    return {
        "pixels_w": pix_w,
        "pixels_l": pix_l,
        "original_size": orig,
        "crop_top_left": crop,
        "target_size": target,
    }


class PairDataset(torch.utils.data.Dataset):
    """Decodes pairs on the fly (the uncached path). A bad item raises, or yields ``None`` when skipping.

    ``sizes`` (aligned with ``records``) gives each pair its (height, width) bucket; default: ``resolution`` square.
    """

    def __init__(
        self,
        records: Sequence[PairRecord],
        resolution: int,
        *,
        random_flip: bool = True,
        random_crop: bool = False,
        joint_crop: bool = False,
        skip_bad: bool = False,
        sizes: Sequence[tuple[int, int]] | None = None,
    ):
        self.records, self.resolution, self.sizes = records, resolution, sizes
        self.random_flip, self.random_crop, self.joint_crop, self.skip_bad = (
            random_flip,
            random_crop,
            joint_crop,
            skip_bad,
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        rec = self.records[i]
        size = self.resolution if self.sizes is None else self.sizes[i]
        try:
            item = decode_pair(rec, size, random_crop=self.random_crop, joint_crop=self.joint_crop)
        except DataError as err:
            if not self.skip_bad:
                raise
            return {"skipped": str(err)}
        if self.random_flip and bool(torch.rand(()) < 0.5):
            item["pixels_w"], item["pixels_l"] = item["pixels_w"].flip(-1), item["pixels_l"].flip(-1)
            item["crop_top_left"] = mirror_crop(item["original_size"], item["crop_top_left"], size)
        item.update(prompt=rec.prompt, item_id=rec.row)
        return item


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep lists of everything else; skipped items are reported under ``skipped``."""
    skipped = [it["skipped"] for it in items if "skipped" in it]
    items = [it for it in items if "skipped" not in it]
    batch: dict[str, Any] = {"skipped": skipped}
    if not items:
        return batch
    for key in items[0]:
        values = [it[key] for it in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
