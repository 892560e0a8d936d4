"""Command-line options shared by the commands that run a model (device, dtype, batch size, offload, verbosity)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmalign.utils import first_line


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
        "--batch-size",
        type=positive_int,
        default=batch_size,
        help=f"samples per model call (default {batch_size})",
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


class _Interrupt:
    """Whether Ctrl-C arrived in this command. A KeyboardInterrupt raised inside an import leaves the import machinery
    to fail later in its own words (numpy's RecursionError, "cannot load module more than once"): those errors are
    then reported as the interruption they are, not as bad input or an internal error."""

    seen = False

    @classmethod
    def handler(cls, signum: int, frame: Any) -> None:
        cls.seen = True
        raise KeyboardInterrupt


def interrupted() -> bool:
    return _Interrupt.seen


@contextlib.contextmanager
def watch_interrupts() -> Iterator[None]:
    """Note Ctrl-C in :func:`interrupted` inside the block (then raise KeyboardInterrupt, as Python's own handler
    does); the previous handler is back afterwards."""
    import signal
    import threading

    _Interrupt.seen = False
    ours = threading.current_thread() is threading.main_thread()
    ours = ours and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours:
        signal.signal(signal.SIGINT, _Interrupt.handler)
    try:
        yield
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)


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
                if interrupted():  # the failure Ctrl-C caused
                    print(f"mmalign {command}: interrupted", file=sys.stderr)
                    return 130
                message = err.args[0] if isinstance(err, KeyError) and err.args else err
                text = " ".join(str(message).split())
                print(
                    f"mmalign {command}: error: {text[:600] + '...' if len(text) > 600 else text}",
                    file=sys.stderr,
                )
                return 2

        return inner

    return wrap


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:50]!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:50]!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{value} is not finite")
    return value


def check_table(path, *, must_exist: bool = False) -> None:
    """A manifest or scores file must be a regular file (not a FIFO or ``/dev/zero``) of at most 1 GiB.

    Folders and (unless ``must_exist``) missing paths pass: the caller reports those.
    """
    from pathlib import Path

    from mmalign.limits import check_media_file

    path = Path(path)
    if not must_exist and (path.is_dir() or not path.exists()):
        return
    check_media_file(path, max_bytes=1 << 30)


def check_out(path) -> None:
    """``--out`` must not be a directory."""
    from pathlib import Path

    if Path(path).is_dir():
        raise ValueError(f"--out {path}: is a directory; give a file")


def configs_root() -> Path:
    """The recipes shipped inside the package (``mmalign/configs``)."""
    return Path(__file__).resolve().parent.parent / "configs"


def shipped_configs() -> list[Path]:
    root = configs_root()
    return sorted(p for p in root.rglob("*.yaml")) if root.is_dir() else []


def resolve_recipe(path: str) -> str:
    """``path`` if it exists, else the shipped file of that name (``toy/quickstart``, ``configs/toy/quickstart.yaml``,
    ``configs/rewards/video_rules.yaml``): the README's paths work after a wheel install, from any directory."""
    if Path(path).exists():
        return path
    name = path[len("configs/") :] if path.startswith("configs/") else path
    for candidate in (name, name + ".yaml"):
        if (configs_root() / candidate).is_file():
            return str(configs_root() / candidate)
    return path


def one_or_many(values: list[str] | None) -> str | list[str] | None:
    """A repeatable flag's values (``action="append"``): None, the one value, or the list of several."""
    if not values:
        return None
    return values[0] if len(values) == 1 else list(values)


def trained_path(text: str) -> str:
    """argparse type of a flag naming a run's export (``--lora``, ``--negative-lora``, ``--user-adapter``): a local
    path as given, or a Hugging Face repo id (``user/name``, e.g. one ``train.push_to_hub`` uploaded) fetched with
    ``snapshot_download`` into the hub cache (offline: from the cache) and given as that folder."""
    import re

    if Path(text).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        return text  # the command reports a missing local path in its own words
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(text)
    except Exception as err:  # hub errors come in many types (offline and not cached, not found, gated)
        raise argparse.ArgumentTypeError(
            f"{text}: no such folder here, and no hub repo of that id could be fetched "
            f"({type(err).__name__}: {first_line(err, 200)})"
        ) from None
