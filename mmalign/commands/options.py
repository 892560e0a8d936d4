"""Command-line options shared by the commands that run a model (device, dtype, batch size, offload, verbosity)."""

from __future__ import annotations

import argparse


def add_runtime_args(parser: argparse.ArgumentParser, *, batch_size: int = 1, offload: bool = True) -> None:
    """``--device``, ``--dtype``, ``--batch-size``, ``--cpu-offload`` and ``--verbose`` (see pipelines/runtime.py)."""
    group = parser.add_argument_group("device and precision")
    group.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda when present)")
    group.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "fp32", "bf16", "fp16"],
        help="model precision (default: bf16 on CUDA, fp32 on CPU)",
    )
    group.add_argument(
        "--batch-size", type=int, default=batch_size, help=f"samples per model call (default {batch_size})"
    )
    if offload:
        group.add_argument(
            "--cpu-offload",
            action="store_true",
            help="keep models on the CPU and move each to the GPU only while it runs (less GPU memory)",
        )
    group.add_argument("--verbose", action="store_true", help="show library loading bars and warnings")


def runtime_kwargs(args: argparse.Namespace) -> dict:
    """The shared options as keyword arguments of the command functions."""
    return {
        "device": args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "cpu_offload": getattr(args, "cpu_offload", False),
        "verbose": args.verbose,
    }


def one_line_errors(command: str):
    """Decorator for a command's ``run(args)``: bad input (ValueError, KeyError, FileNotFoundError) prints one
    line ``mmalign <command>: error: ...`` on stderr and returns exit code 2 instead of a traceback."""
    import functools
    import sys

    def wrap(run):
        @functools.wraps(run)
        def inner(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except (ValueError, KeyError, FileNotFoundError) as err:
                message = err.args[0] if isinstance(err, KeyError) and err.args else err
                print(f"mmalign {command}: error: {message}", file=sys.stderr)
                return 2

        return inner

    return wrap
