"""FSDP2 (``fully_shard``, accelerate's ``fsdp_version: 2``): what the loop does differently when weights are sharded.

Under FSDP2 every trainable parameter, its gradient and its optimizer state are ``DTensor`` shards: each process
holds a slice. Three things in the loop then need every process, not just the main one:

- **checkpoints** hold full tensors (the same files as an unsharded run, so a sharded run's checkpoint resumes
  on any number of processes): each shard is gathered (a collective), the main process keeps and writes it, and on
  resume each process reads only its own slice of each stored tensor (:func:`shard_from`);
- **export** (``final/``): the weights are gathered (:func:`full_state_dict`) while the main process writes them;
- **validation sampling**: a sharded forward all-gathers each block's weights, so every process samples.

None of this runs for DDP or one process: :func:`is_sharded` is false there and every helper is the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_sharded(params: Iterable[torch.Tensor]) -> bool:
    """Whether any of ``params`` is a DTensor (FSDP2 has sharded the model)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in params)


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor shard (a collective: every process must call it, in the same order)."""
    dtensor = _dtensor_type()
    return t.full_tensor() if dtensor is not None and isinstance(t, dtensor) else t


def local_region(like: torch.Tensor) -> tuple[slice, ...] | None:
    """The part of the full tensor this process holds in ``like``'s layout, one slice per dimension; None when
    ``like`` is a plain tensor (the process holds all of it). No communication: the layout alone decides it."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(like, dtensor):
        return None
    # torch's own arithmetic for every placement (uneven shards, several mesh dimensions); a private module
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def shard_from(read: Callable[[tuple[slice, ...] | None], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A stored tensor laid out as ``like``, reading only what this process holds: ``read(region)`` returns that
    region of the full tensor (``read(None)``: all of it). A DTensor shard when ``like`` is one, else the whole."""
    region = local_region(like)
    if region is None:
        return read(None)
    from torch.distributed.tensor import DTensor

    local = read(region).to(like.device).contiguous()
    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


@contextmanager
def full_state_dict(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block, ``model.state_dict()`` returns the full (gathered, CPU) weights on the main process.

    FSDP2's own ``state_dict`` hands out DTensor shards, which diffusers' ``save_pretrained`` and peft's
    ``get_peft_model_state_dict`` cannot write. Gathering them is a collective (torch's ``get_model_state_dict``
    with ``full_state_dict``, ``cpu_offload``: only rank 0 keeps the copy), so every process enters the block;
    exporters then run unchanged on the main process. Outside FSDP2 it does nothing.
    """
    if not is_sharded(model.parameters()):
        yield model
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model.state_dict = lambda *args, **kwargs: dict(full)  # an instance attribute shadows the method
    try:
        yield model
    finally:
        del model.state_dict
