"""Worker for test_distributed.py: on each of the torchrun processes, every tensor of a checkpoint file read in
an FSDP2 parameter's layout (``StoredTensors.read_like``) equals the shard ``distribute_tensor`` cuts from the
full tensor, with uneven row counts (a process may hold no rows), and no whole tensor is read.

    python tests/integration/dist_read_like.py FILE.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

from mmalign.trainers.checkpoint import StoredTensors

SHAPES = {"a": (5, 3), "b": (1, 4), "c": (7,), "d": (3, 2, 2), "e": (4, 6)}


def main(path: str) -> None:
    dist.init_process_group("gloo")
    model = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.zeros(s)) for k, s in SHAPES.items()})
    fully_shard(model)
    full = load_file(path)

    def no_whole_reads(self, key):
        raise AssertionError(f"{key}: the whole tensor was read")

    stored = StoredTensors(Path(path))
    StoredTensors.__getitem__ = no_whole_reads
    for key, p in model.items():
        got = stored.read_like(key, p)
        want = distribute_tensor(full[key], p.device_mesh, p.placements, src_data_rank=None)
        assert got.placements == p.placements and got.shape == p.shape, key
        assert torch.equal(got.to_local(), want.to_local()), key
        assert torch.equal(got.full_tensor(), full[key]), key
        print(
            f"rank {dist.get_rank()} {key}: rows {tuple(got.to_local().shape)} of {tuple(p.shape)}",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
