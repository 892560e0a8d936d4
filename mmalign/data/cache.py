"""Latent and text-embedding cache in safetensors shards.

Neither VAE latents nor text embeddings depend on the weights being trained, so they are encoded once
(posterior mean and std of each image, both flips when flipping is on; every prompt's conditioning
tensors) and training reads them back: no VAE or text-encoder pass per step. The cache directory is keyed
by a fingerprint of (model, VAE, family, resolution, crop mode); items are keyed by a hash of the image
bytes, prompts by a hash of the text, so runs over overlapping data share work. Shards are written to a
temporary name and renamed, and the index is rewritten atomically after each shard, so an interrupted
build resumes where it stopped. Shard names are unique per writer and index updates are merged under a file
lock (:mod:`mmalign.data.index_file`), so concurrent runs sharing the cache lose none of each other's entries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmalign.data.images import DataError, mirror_crop
from mmalign.data.index_file import merge_update, read_index, unique_name, write_atomic
from mmalign.data.pairs import PairRecord, decode_pair
from mmalign.limits import MediaError, file_digest
from mmalign.utils import short_hash

CACHE_VERSION = 1


def fingerprint_dir(root: str | Path, fingerprint: dict[str, Any]) -> Path:
    blob = json.dumps({"version": CACHE_VERSION, **fingerprint}, sort_keys=True, default=str)
    return Path(root) / short_hash(blob)


def estimate_pair_bytes(vae_config: Any, resolution: int, random_flip: bool, dtype_bytes: int = 4) -> int:
    """Bytes one cached pair takes: posterior mean and std of both images (and of their flips), in float32.

    For SDXL at 1024 px: 4 x 128 x 128 latents x 2 (mean, std) x 2 images x 2 (flip) x 4 B = 2.1 MB per pair,
    about 2 TB for Pick-a-Pic v2's 959k pairs.
    """
    channels = int(vae_config.get("latent_channels", 4))
    factor = 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)
    side = resolution // factor
    return channels * side * side * 2 * 2 * (2 if random_flip else 1) * dtype_bytes


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def pair_key(rec: PairRecord) -> str:
    """Content hash of both images (a missing, irregular or oversized file raises, naming the row).

    Files are hashed in blocks after :func:`mmalign.limits.check_media_file`: a FIFO or ``/dev/zero`` is
    refused instead of read forever.
    """
    parts = []
    for which in ("chosen", "rejected"):
        src = getattr(rec, which)
        if isinstance(src, bytes):
            parts.append(short_hash(src))
        else:
            try:
                parts.append(
                    file_digest(src).hex()[:20]
                )  # == short_hash(the file bytes): old cache keys stay valid
            except MediaError as err:
                raise DataError(f"{rec.where(which)}: {err}") from None
    return short_hash(parts[0] + parts[1])


def _empty_index() -> dict[str, Any]:
    return {"pairs": {}, "text": {}, "bad": {}}


def _merge_index(on_disk: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
    """Union of two indexes: every entry either run wrote (both point at complete shards)."""
    merged = dict(on_disk)
    for kind, entries in mine.items():
        if isinstance(entries, dict):
            merged[kind] = {**on_disk.get(kind, {}), **entries}
        elif entries:  # e.g. text_keys: the same for every run of one fingerprint
            merged[kind] = entries
    return merged


class LatentCache:
    """Read/write access to one fingerprinted cache directory."""

    def __init__(self, root: str | Path, fingerprint: dict[str, Any]):
        self.fingerprint = fingerprint
        self.dir = fingerprint_dir(root, fingerprint)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "fingerprint.json"
        if not meta.exists():
            write_atomic(meta, json.dumps(fingerprint, indent=1, sort_keys=True, default=str))
        self.index: dict[str, Any] = read_index(self.dir / "index.json", _empty_index)
        self._handles: dict[str, Any] = {}
        self._memory: dict[str, torch.Tensor] = {}  # lazily encoded entries not yet in a shard
        self._queued: list[str] = []
        self.lazy_shard_size = 256

    # ---- reading
    def _get(self, shard: str, name: str) -> torch.Tensor:
        if shard == "<memory>":
            return self._memory[name]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self._handles[shard].get_tensor(name)

    def has_pair(self, key: str) -> bool:
        return key in self.index["pairs"]

    def pair(self, key: str, flip: bool = False) -> dict[str, Any]:
        shard = self.index["pairs"][key]
        f = "f" if flip else ""
        meta = [int(v) for v in self._get(shard, f"{key}.meta").tolist()]
        original, crop = (meta[0], meta[1]), (meta[2], meta[3])
        if len(meta) >= 6:
            target = (meta[4], meta[5])
        else:  # entries written before aspect-ratio buckets: square
            target = (self.fingerprint["resolution"],) * 2
        return {
            "mean_w": self._get(shard, f"{key}.w{f}.mean"),
            "std_w": self._get(shard, f"{key}.w{f}.std"),
            "mean_l": self._get(shard, f"{key}.l{f}.mean"),
            "std_l": self._get(shard, f"{key}.l{f}.std"),
            "original_size": original,
            "crop_top_left": mirror_crop(original, crop, target) if flip else crop,
            "target_size": target,
        }

    def text(self, prompt: str) -> dict[str, torch.Tensor]:
        key = short_hash(prompt)
        if key not in self.index["text"]:
            raise KeyError(f"prompt not in the text cache: {prompt!r}")
        shard = self.index["text"][key]
        names = self.index["text_keys"]
        return {name: self._get(shard, f"{key}.{name}") for name in names}

    # ---- writing
    def _write_shard(self, prefix: str, tensors: dict[str, torch.Tensor], kind: str, keys: list[str]) -> None:
        shard = unique_name(prefix)  # never the name another run sharing this cache picks
        tmp = self.dir / f".{shard}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.dir / shard)
        for key in keys:
            self.index[kind][key] = shard
        self._save_index()

    def _save_index(self) -> None:
        """Merge this run's entries into the index on disk under a file lock (concurrent runs lose nothing).

        Entries held only in memory (``<memory>``, the lazy cache) are not written; other runs' entries are
        picked up, this run's own entries win.
        """
        persisted = {
            kind: (
                {k: v for k, v in entries.items() if v != "<memory>"}
                if isinstance(entries, dict)
                else entries
            )
            for kind, entries in self.index.items()
        }
        merged = merge_update(self.dir / "index.json", persisted, _merge_index, _empty_index)
        for kind, entries in merged.items():
            if isinstance(entries, dict):
                mine = self.index.setdefault(kind, {})
                for key, value in entries.items():
                    mine.setdefault(key, value)
            else:
                self.index.setdefault(kind, entries)

    def build(
        self,
        records: Sequence[PairRecord],
        adapter: Any,
        *,
        resolution: int,
        random_flip: bool,
        random_crop: bool = False,
        joint_crop: bool = False,
        batch_size: int = 8,
        skip_bad: bool = False,
        prompts_extra: tuple[str, ...] = ("",),
        progress: bool = True,
        shard_size: int = 256,
        is_main_process: bool = True,
        max_bytes: float | None = None,
        log: Any = print,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> tuple[list[PairRecord], list[str], list[str]]:
        """Encode whatever is missing. Returns (usable records, their keys, skipped-item messages).

        With ``skip_bad`` a corrupt or missing image drops its pair (the message names row and file);
        otherwise the first one raises :class:`DataError`. Only the main process writes; call again on the
        others after a barrier to read the finished index. Before encoding, the size of what is missing is
        estimated and logged; above ``max_bytes`` the build is refused (train uncached: ``data.cache=false``).
        ``sizes`` (aligned with ``records``) gives each pair its (height, width) aspect-ratio bucket; pairs are
        encoded in batches of one bucket, and each kept record carries its bucket in ``extra["target_size"]``.
        """
        from tqdm.auto import tqdm

        keep, keys, skipped, todo = [], [], [], []
        for idx in range(len(records)):
            rec = records[idx]
            try:
                key = pair_key(rec)
            except DataError as err:
                if not skip_bad:
                    raise
                skipped.append(str(err))
                continue
            if key in self.index["bad"]:
                if not skip_bad:
                    raise DataError(self.index["bad"][key])
                skipped.append(self.index["bad"][key])
                continue
            # Keep what training reads (prompt, row) and file paths (small), not image bytes: those of Arrow-backed
            # records are re-read from the memory-mapped table when encoded, so memory does not grow with the pairs.
            keep.append(
                PairRecord(
                    rec.prompt,
                    *(src if isinstance(src, str) else "" for src in (rec.chosen, rec.rejected)),
                    rec.row,
                    rec.label_0,
                    rec.user_id,
                    {} if sizes is None else {"target_size": tuple(sizes[idx])},
                )
            )
            keys.append(key)
            if not self.has_pair(key):
                todo.append((key, idx))
        if todo and is_main_process:
            need = len(todo) * estimate_pair_bytes(dict(adapter.vae.config), resolution, random_flip)
            where = self.dir
            log(
                f"latent cache: {len(todo)} of {len(keep)} pairs to encode, about {format_bytes(need)} in {where}"
            )
            if max_bytes is not None and need > max_bytes:
                raise DataError(
                    f"the latent cache would need about {format_bytes(need)} for {len(todo)} pairs, over "
                    f"data.cache_max_gb={max_bytes / 1024**3:g}; raise it, set data.max_items, or train "
                    "uncached with data.cache=false"
                )
        prompts = sorted({r.prompt for r in keep} | set(prompts_extra))
        text_todo = [p for p in prompts if short_hash(p) not in self.index["text"]]
        if not is_main_process:
            return keep, keys, skipped

        bar = tqdm(
            total=len(todo) + len(text_todo),
            desc="caching latents/embeddings",
            disable=not progress or not (todo or text_todo),
        )
        gen = torch.Generator().manual_seed(0)  # random crops are drawn once per item, reproducibly
        pending: dict[str, torch.Tensor] = {}
        pending_keys: list[str] = []
        bad_keys: set[str] = set()
        size_of = (lambda idx: resolution) if sizes is None else (lambda idx: tuple(sizes[idx]))
        groups: dict[Any, list[tuple[str, int]]] = {}
        for key, idx in todo:  # one bucket per encoding batch (all of them when training square)
            groups.setdefault(size_of(idx), []).append((key, idx))
        chunks = [g[s : s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]
        for chunk in chunks:
            decoded = []
            for key, idx in chunk:
                rec = records[idx]
                try:
                    decoded.append(
                        (
                            key,
                            decode_pair(
                                rec,
                                size_of(idx),
                                random_crop=random_crop,
                                joint_crop=joint_crop,
                                generator=gen,
                            ),
                        )
                    )
                except DataError as err:
                    if not skip_bad:
                        raise
                    self.index["bad"][key] = str(err)
                    bad_keys.add(key)
                    skipped.append(str(err))
            if decoded:
                pix = torch.cat(
                    [
                        torch.stack([d["pixels_w"] for _, d in decoded]),
                        torch.stack([d["pixels_l"] for _, d in decoded]),
                    ]
                )
                variants = {"": pix, "f": pix.flip(-1)} if random_flip else {"": pix}
                for suffix, x in variants.items():
                    mean, std = adapter.latent_moments(x)
                    n = len(decoded)
                    for i, (key, _) in enumerate(decoded):
                        pending[f"{key}.w{suffix}.mean"], pending[f"{key}.w{suffix}.std"] = mean[i], std[i]
                        pending[f"{key}.l{suffix}.mean"], pending[f"{key}.l{suffix}.std"] = (
                            mean[n + i],
                            std[n + i],
                        )
                for key, d in decoded:
                    pending[f"{key}.meta"] = torch.tensor(
                        [*d["original_size"], *d["crop_top_left"], *d["target_size"]], dtype=torch.int64
                    )
                    pending_keys.append(key)
            bar.update(len(chunk))
            if len(pending_keys) >= shard_size:
                self._write_shard("latents", pending, "pairs", pending_keys)
                pending, pending_keys = {}, []
        if pending_keys:
            self._write_shard("latents", pending, "pairs", pending_keys)
        elif bad_keys:
            self._save_index()

        for start in range(0, len(text_todo), max(batch_size, 32)):
            chunk = text_todo[start : start + max(batch_size, 32)]
            cond = adapter.encode_prompts(chunk)
            self.index["text_keys"] = sorted(cond)
            tensors = {
                f"{short_hash(p)}.{name}": value[i]
                for name, value in cond.items()
                for i, p in enumerate(chunk)
            }
            self._write_shard("text", tensors, "text", [short_hash(p) for p in chunk])
            bar.update(len(chunk))
        bar.close()
        if bad_keys:
            keep_keys = [(r, k) for r, k in zip(keep, keys) if k not in bad_keys]
            keep, keys = [r for r, _ in keep_keys], [k for _, k in keep_keys]
        return keep, keys, skipped

    # ---- lazy filling (data.cache_build=lazy): encode on first use, from the training process
    def has_text(self, prompt: str) -> bool:
        return short_hash(prompt) in self.index["text"]

    def encode_missing_text(self, prompts: Sequence[str], adapter: Any, *, write: bool = True) -> None:
        """Encode the prompts not in the cache yet and store them (one shard per call)."""
        todo = sorted({p for p in prompts if not self.has_text(p)})
        if not todo:
            return
        cond = adapter.encode_prompts(todo)
        self.index["text_keys"] = sorted(cond)
        tensors = {
            f"{short_hash(p)}.{name}": value[i] for name, value in cond.items() for i, p in enumerate(todo)
        }
        if write:
            self._write_shard("text", tensors, "text", [short_hash(p) for p in todo])
        else:  # a non-writing process keeps them in memory
            self._memory.update(tensors)
            self.index["text"].update({short_hash(p): "<memory>" for p in todo})

    def add_pair_moments(
        self, tensors: dict[str, torch.Tensor], keys: list[str], *, write: bool = True
    ) -> None:
        """Queue freshly encoded pairs (``<key>.w.mean`` ... as :meth:`build` writes them); a shard is written every
        ``lazy_shard_size`` pairs and at :meth:`flush_lazy`. Until then they are served from memory."""
        self._memory.update(tensors)
        for key in keys:
            self.index["pairs"][key] = "<memory>"
        if not write:
            return
        self._queued.extend(keys)
        if len(self._queued) >= self.lazy_shard_size:
            self.flush_lazy()

    def flush_lazy(self) -> None:
        """Write the queued pairs as one shard (the loop calls it at each checkpoint and at the end of a run, so a
        run of fewer than ``lazy_shard_size`` pairs leaves its encodings to the next run too)."""
        if not self._queued:
            return
        queued, self._queued = self._queued, []
        wanted = set(queued)
        names = {k: v for k, v in self._memory.items() if k.split(".", 1)[0] in wanted}
        self._write_shard("latents", names, "pairs", queued)
        for name in names:
            self._memory.pop(name, None)

    def reload(self) -> None:
        """Re-read the index (after another process finished building)."""
        self.index = read_index(self.dir / "index.json", _empty_index)
        self._handles.clear()


class CachedPairDataset(torch.utils.data.Dataset):
    """Pairs served from the cache: posterior moments (a flip drawn per item), prompt and SDXL metadata."""

    def __init__(
        self, records: list[PairRecord], keys: list[str], cache: LatentCache, *, random_flip: bool = True
    ):
        self.records, self.keys, self.cache, self.random_flip = records, keys, cache, random_flip

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        item = self.cache.pair(self.keys[i], flip=flip)
        item.update(prompt=self.records[i].prompt, item_id=self.records[i].row)
        return item


class LazyCachedPairDataset(torch.utils.data.Dataset):
    """``data.cache_build=lazy``: no encoding pass before step 1. An item already in the cache is served from it
    (posterior moments); any other is decoded to pixels here, in the DataLoader worker, and
    :func:`mmalign.data.setup.prepare_lazy_batch` encodes it on the training device and adds it to the cache, so
    later epochs and later runs read it back. Items are keyed by content hash as with :meth:`LatentCache.build`.
    """

    def __init__(
        self,
        records: Sequence[PairRecord],
        cache: LatentCache,
        *,
        resolution: int,
        random_flip: bool = True,
        random_crop: bool = False,
        joint_crop: bool = False,
        skip_bad: bool = False,
        sizes: Sequence[tuple[int, int]] | None = None,
    ):
        self.records, self.cache, self.resolution, self.sizes = records, cache, resolution, sizes
        self.random_flip, self.random_crop, self.joint_crop, self.skip_bad = (
            random_flip,
            random_crop,
            joint_crop,
            skip_bad,
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        try:
            key = pair_key(rec)
            if self.cache.has_pair(key) and self.cache.index["pairs"][key] != "<memory>":
                item = self.cache.pair(key, flip=flip)
            else:
                size = self.resolution if self.sizes is None else tuple(self.sizes[i])
                item = decode_pair(rec, size, random_crop=self.random_crop, joint_crop=self.joint_crop)
        except DataError as err:
            if not self.skip_bad:
                raise
            return {"skipped": str(err)}
        item.update(key=key, flip=flip, prompt=rec.prompt, item_id=rec.row)
        return item


def collate_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Keep items as a list (a lazy batch mixes cached moments and fresh pixels); lists of prompt/id/metadata."""
    skipped = [it["skipped"] for it in items if "skipped" in it]
    items = [it for it in items if "skipped" not in it]
    return {
        "skipped": skipped,
        "items": items,
        "prompt": [it["prompt"] for it in items],
        "item_id": [it["item_id"] for it in items],
        "original_size": [it["original_size"] for it in items],
        "crop_top_left": [it["crop_top_left"] for it in items],
        "target_size": [it["target_size"] for it in items],
    }
