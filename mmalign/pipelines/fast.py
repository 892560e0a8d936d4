"""Fast paths for a denoiser, applied by the loop to the trained network (and a full fine-tune's frozen copy).

Each one changes how the step runs, never what it computes (tests/unit/test_fast_paths.py compares loss and
gradients with eager on a tiny model):

- ``compile``: ``none``; ``regional`` compiles each repeated block in place (diffusers' ``compile_repeated_blocks``
  where the model lists ``_repeated_blocks``, else every outermost ``*Block`` class that occurs more than once),
  so compile time is one block's, not the whole network's; ``full`` compiles the whole denoiser in place
  (``nn.Module.compile``: the state-dict keys, checkpoints and LoRA export are unchanged).
- ``channels_last``: 4-D weights (2-D convolutions) in NHWC, so cuDNN/oneDNN convolutions skip layout transposes.
- ``attention_backend``: ``sdpa`` (torch's scaled_dot_product_attention, diffusers' default) or ``xformers``
  (diffusers' ``enable_xformers_memory_efficient_attention``; needs the ``[xformers]`` extra and CUDA).
- ``checkpoint_policy`` (with gradient checkpointing on): what a checkpointed block keeps for backward.
  ``recompute_all`` (diffusers' default) keeps only the block's inputs and re-runs its whole forward in backward;
  ``save_attention`` keeps the attention kernels' outputs, so backward re-runs everything but attention;
  ``save_matmuls`` keeps every matmul, convolution and attention output, so backward re-runs only the cheap
  element-wise ops (norms, activations, casts). torch's selective activation checkpointing
  (``create_selective_checkpoint_contexts``) through diffusers' ``enable_gradient_checkpointing(func)``.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

COMPILE_CHOICES = ("none", "regional", "full")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTION_BACKENDS = ("sdpa", "xformers")
CHECKPOINT_POLICIES = ("recompute_all", "save_attention", "save_matmuls")

# aten ops whose outputs a selective policy keeps (names; the ones this torch build lacks are skipped)
_ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward",
    "_efficient_attention_forward",
)
_MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution")


class FastPathError(ValueError):
    """A fast path cannot be applied to this model or machine; the message names the option and the fix."""


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules regional compilation compiles: the classes in ``model._repeated_blocks`` (diffusers), else the
    outermost modules whose class name ends in ``Block`` and occurs more than once (e.g. CogVideoXBlock)."""
    names = getattr(model, "_repeated_blocks", None)
    if names:
        return [m for m in model.modules() if type(m).__name__ in names]
    counts = collections.Counter(type(m).__name__ for m in model.modules())
    wanted = {name for name, n in counts.items() if name.endswith("Block") and n > 1}
    found: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():  # pre-order: a block is seen before anything inside it
        if id(module) in inside:
            continue
        if type(module).__name__ in wanted:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def compile_denoiser(
    model: torch.nn.Module, how: str, *, mode: str = "default", backend: str = "inductor"
) -> int:
    """Compile ``model`` in place (``how`` = regional | full); returns how many modules were compiled.

    ``backend`` is torch.compile's (tests use ``aot_eager``: the same graph capture and autograd, no codegen).
    """
    if how not in COMPILE_CHOICES:
        raise FastPathError(f"train.compile={how!r}: choose from {', '.join(COMPILE_CHOICES)}")
    if mode not in COMPILE_MODES:
        raise FastPathError(f"train.compile_mode={mode!r}: choose from {', '.join(COMPILE_MODES)}")
    if how == "none":
        return 0
    kwargs: dict[str, Any] = {"backend": backend}
    if backend == "inductor":
        kwargs["mode"] = mode  # modes belong to inductor; other backends reject them
    if how == "full":
        model.compile(**kwargs)
        return 1
    blocks = repeated_blocks(model)
    if not blocks:
        raise FastPathError(
            f"train.compile=regional: {type(model).__name__} has no repeated blocks to compile; use train.compile=full"
        )
    for block in blocks:
        block.compile(**kwargs)
    return len(blocks)


def to_channels_last(model: torch.nn.Module) -> int:
    """Store every 4-D weight (2-D convolutions) channels-last, in place; returns how many tensors moved.

    Only rank-4 tensors have an NHWC layout; a video model's 5-D and linear weights are left as they are.
    """
    n = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
            n += 1
    return n


def set_attention_backend(model: torch.nn.Module, backend: str) -> None:
    """``sdpa``: leave diffusers' default processors (torch SDPA); ``xformers``: diffusers' xformers processors."""
    if backend not in ATTENTION_BACKENDS:
        raise FastPathError(
            f"train.attention_backend={backend!r}: choose from {', '.join(ATTENTION_BACKENDS)}"
        )
    if backend == "sdpa":
        return
    if importlib.util.find_spec("xformers") is None:
        raise FastPathError(
            "train.attention_backend=xformers needs xformers: pip install 'mmalign[xformers]' (or use sdpa)"
        )
    if not torch.cuda.is_available():
        raise FastPathError("train.attention_backend=xformers needs a CUDA device; use sdpa on this machine")
    if not hasattr(model, "enable_xformers_memory_efficient_attention"):
        raise FastPathError(
            f"train.attention_backend=xformers: {type(model).__name__} is not a diffusers model; use sdpa"
        )
    model.enable_xformers_memory_efficient_attention()


def _saved_ops(policy: str) -> frozenset:
    names = _ATTENTION_OPS + (_MATMUL_OPS if policy == "save_matmuls" else ())
    return frozenset(getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n))


def checkpointing_function(policy: str) -> Callable | None:
    """The ``gradient_checkpointing_func`` for diffusers' ``enable_gradient_checkpointing`` that implements
    ``policy``; None for ``recompute_all`` (diffusers' own function: non-reentrant ``checkpoint``)."""
    if policy not in CHECKPOINT_POLICIES:
        raise FastPathError(
            f"train.checkpoint_policy={policy!r}: choose from {', '.join(CHECKPOINT_POLICIES)}"
        )
    if policy == "recompute_all":
        return None
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    saved = _saved_ops(policy)

    def keep(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op.overloadpacket in saved else CheckpointPolicy.PREFER_RECOMPUTE

    contexts = functools.partial(create_selective_checkpoint_contexts, keep)

    def selective_checkpoint(module: torch.nn.Module, *args: Any) -> Any:
        return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)

    return selective_checkpoint


def enable_checkpointing(model: torch.nn.Module, policy: str = "recompute_all") -> None:
    """Gradient checkpointing on ``model`` (a diffusers model) with ``policy`` (see the module docstring)."""
    func = checkpointing_function(policy)
    if not hasattr(model, "enable_gradient_checkpointing"):
        raise FastPathError(
            f"train.gradient_checkpointing: {type(model).__name__} is not a diffusers model with checkpointing"
        )
    model.enable_gradient_checkpointing(func)


def apply_fast_paths(
    model: torch.nn.Module,
    *,
    compile: str = "none",
    compile_mode: str = "default",
    channels_last: bool = False,
    attention_backend: str = "sdpa",
    compile_backend: str = "inductor",
) -> dict[str, Any]:
    """Attention backend, then memory format, then compilation (compile last: it traces what the others set).

    Call it after LoRA adapters and gradient checkpointing are in place. Returns what was done, for the log.
    """
    set_attention_backend(model, attention_backend)
    moved = to_channels_last(model) if channels_last else 0
    compiled = compile_denoiser(model, compile, mode=compile_mode, backend=compile_backend)
    return {
        "attention_backend": attention_backend,
        "channels_last_tensors": moved,
        "compiled_modules": compiled,
    }
