"""Per-item seeds for data augmentation, so what an item looks like never depends on the global RNG.

Datasets draw their augmentation (random flips, crops, inversion steps ...) from torch's global RNG. Loaded
that way, an item's flip depends on everything drawn before it: the training step's noise, accelerate's
one-batch prefetch, which batches a resumed run skipped, which worker loaded it. :class:`SeededItems` runs
each ``dataset[i]`` with the CPU generator seeded from ``(seed, epoch, i)`` and restores the global state
afterwards: the item is the same whichever process, worker or resume loads it, and the training step's
own draws are untouched.
"""

from __future__ import annotations

from typing import Any

import torch

_MASK = (1 << 63) - 1


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A seed that depends only on (run seed, epoch, item index): splitmix64-style mixing of the three."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (
        (1 << 64) - 1
    )
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    return (x ^ (x >> 32)) & _MASK


class SeededItems(torch.utils.data.Dataset):
    """``dataset[i]`` with torch's CPU RNG seeded from ``(seed, epoch, i)``; the global state is restored after.

    Call :meth:`set_epoch` before each epoch's iterator is created (data-loader workers copy the dataset then).
    """

    def __init__(self, dataset: Any, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(item_seed(self.seed, self.epoch, int(i)))
            return self.dataset[i]
