"""Inversion cache: DDIM-inverted trajectories of the cached latents, in safetensors shards.

With a frozen inverter (the reference) an inverted trajectory depends only on (image, prompt, inverter,
grid, guidance), so Inversion-DPO computes it once and every epoch reads it back: zero inverter calls per
training step. The cache lives beside the latent cache, inside its fingerprinted directory
(``<latent cache>/inversion/<fingerprint>``), so a change of model, VAE or resolution moves it too. Its own
fingerprint covers the inverter (checkpoint id and a hash of its weights), the grid (steps, spacing, offset,
start level), the guidance scale, the unconditional branch, what is stored and the storage dtype; an entry
is keyed by a hash of the clean latent it inverts (the image as cropped and flipped) and of the prompt, so an
image that appears in several pairs (all-pairs labelling: up to k(k-1)/2 pairs per prompt) is inverted once.
Change any of these and the entries are computed afresh (the old directory stays, unused, until deleted).

What is inverted: the VAE posterior *mean* of each image, scaled like the training latents. The latent cache
stores posterior moments and Diffusion-DPO samples a latent from them per step; inversion needs one
deterministic ``x0`` to be reusable, so Inversion-DPO trains on the mean (the trajectory is only valid for
the ``x0`` it started from).

Per entry (N = grid steps, latent shape [C, H, W]): ``<key>.x`` [N, C, H, W], the inverted latents
``x_1..x_N``; with ``store_eps`` also ``<key>.eps`` [N, C, H, W], the inverter's guided eps of each step (the
reference prediction of ``trajectory`` mode).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmalign.data.index_file import merge_update, read_index, unique_name, write_atomic
from mmalign.utils import short_hash

INVERSION_CACHE_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def module_fingerprint(module: torch.nn.Module, samples: int = 64) -> str:
    """Cheap content hash of a network: names, shapes and ``samples`` evenly strided values of every tensor.

    Catches a different checkpoint at the same path (or a LoRA merged in) without hashing gigabytes.
    """
    h = hashlib.sha1()
    for name, tensor in list(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def entry_key(latent_mean: torch.Tensor, prompt: str) -> str:
    """Key of one inverted image: a hash of its cached posterior mean (crop and flip included) and the prompt."""
    data = latent_mean.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return short_hash(short_hash(data) + short_hash(prompt))


class InversionCache:
    """Read/write access to one fingerprinted inversion directory."""

    def __init__(self, root: str | Path, fingerprint: dict[str, Any]):
        blob = json.dumps({"version": INVERSION_CACHE_VERSION, **fingerprint}, sort_keys=True, default=str)
        self.fingerprint = fingerprint
        self.dir = Path(root) / "inversion" / short_hash(blob)
        self.dtype = DTYPES[fingerprint.get("dtype", "float32")]
        self.store_eps = bool(fingerprint.get("store_eps", False))
        self.index: dict[str, str] = {}
        self._handles: dict[str, Any] = {}
        self.reload()

    def reload(self) -> None:
        """Re-read the index (after another process finished building)."""
        self.index = read_index(self.dir / "index.json", dict)
        self._handles.clear()

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    # ---- reading
    def _slice(self, key: str, name: str, steps: list[int] | None) -> torch.Tensor:
        shard = self.index[key]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        handle = self._handles[shard]
        if steps is None:
            return handle.get_tensor(f"{key}.{name}").float()
        view = handle.get_slice(f"{key}.{name}")  # reads only the requested steps from disk
        return torch.stack([view[i] for i in steps]).float()

    def latents(self, key: str, steps: list[int] | None = None) -> torch.Tensor:
        """Inverted latents [len(steps) or N, C, H, W]; ``steps`` are 0-based indices into ``x_1..x_N``."""
        return self._slice(key, "x", steps)

    def eps(self, key: str, steps: list[int] | None = None) -> torch.Tensor:
        if not self.store_eps:
            raise KeyError(f"{self.dir}: built without the reference eps (store_eps=False)")
        return self._slice(key, "eps", steps)

    # ---- writing
    def _write_shard(self, tensors: dict[str, torch.Tensor], keys: list[str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "fingerprint.json"
        if not meta.exists():
            write_atomic(meta, json.dumps(self.fingerprint, indent=1, sort_keys=True, default=str))
        shard = unique_name("inv")  # never the name a concurrent run sharing this cache picks
        tmp = self.dir / f".{shard}.tmp"
        save_file({k: v.detach().to("cpu", self.dtype).contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.dir / shard)
        for key in keys:
            self.index[key] = shard
        # merged with what concurrent runs wrote, under a file lock
        self.index = merge_update(
            self.dir / "index.json", self.index, lambda disk, mine: {**disk, **mine}, dict
        )

    def build(
        self,
        items: Iterable[tuple[str, Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]]],
        invert: Callable[[torch.Tensor, dict[str, torch.Tensor]], Any],
        *,
        batch_size: int = 8,
        shard_size: int = 256,
        progress: bool = True,
    ) -> int:
        """Invert every item not yet cached. Returns how many were inverted (0 on a warm cache).

        Args:
            items: ``(key, load)`` pairs; ``load()`` gives the clean latent [C, H, W] and its conditioning
                (dict of [...] tensors, no batch dim), called only for missing keys.
            invert: ``invert(x0 [b, ...], cond) -> Inversion`` (:func:`mmalign.pipelines.inversion.ddim_invert`).
        """
        from tqdm.auto import tqdm

        todo, seen = [], set()
        for key, load in items:
            if key not in self.index and key not in seen:
                seen.add(key)
                todo.append((key, load))
        if not todo:
            return 0
        bar = tqdm(total=len(todo), desc="DDIM-inverting latents", disable=not progress)
        pending: dict[str, torch.Tensor] = {}
        pending_keys: list[str] = []
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            loaded = [load() for _, load in chunk]
            x0 = torch.stack([x for x, _ in loaded])
            cond = {k: torch.stack([c[k] for _, c in loaded]) for k in loaded[0][1]}
            inv = invert(x0, cond)
            for i, (key, _) in enumerate(chunk):
                pending[f"{key}.x"] = inv.latents[i]
                if self.store_eps:
                    pending[f"{key}.eps"] = inv.eps[i]
                pending_keys.append(key)
            bar.update(len(chunk))
            if len(pending_keys) >= shard_size:
                self._write_shard(pending, pending_keys)
                pending, pending_keys = {}, []
        if pending_keys:
            self._write_shard(pending, pending_keys)
        bar.close()
        return len(todo)
