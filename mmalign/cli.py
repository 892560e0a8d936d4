"""``mmalign`` command line: train | validate | ls | cp | generate | score | label | eval | toy | quickstart.

Each subcommand is a function taking the parsed arguments and returning an exit code. Exit codes:

- 0: done;
- 2: the input was wrong (config, override, data, media, model path, a missing optional dependency): one line
  naming the file, key, row or pip extra;
- 3: the run failed for another reason: one line with the error and the path of a log file holding the
  traceback (``$MMALIGN_LOG_DIR``, default ``<tmp>/mmalign-logs``); training stopped by a NaN loss also exits 3.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# Subcommand modules, each exposing register(subparsers). Explicit, in the order `--help` lists them.
COMMAND_MODULES = [
    "mmalign.commands.train",
    "mmalign.commands.generate",
    "mmalign.commands.score",
    "mmalign.commands.label",
    "mmalign.commands.eval",
    "mmalign.commands.label_video",
    "mmalign.commands.cache",
    "mmalign.toy.cli",
    "mmalign.commands.annotate",
    "mmalign.commands.personalize",
]


def build_parser() -> argparse.ArgumentParser:
    import mmalign

    parser = argparse.ArgumentParser(
        prog="mmalign", description="Preference-tune diffusers image and video models."
    )
    parser.add_argument("--version", action="version", version=f"mmalign {mmalign.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def _one_line(err: BaseException, limit: int = 600) -> str:
    """The error's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def write_crash_log(command: str, argv: list[str]) -> Path:
    """Write the current exception's traceback (and the command line) to a new log file; return its path."""
    import os
    import tempfile
    import time
    import traceback

    root = Path(os.environ.get("MMALIGN_LOG_DIR") or Path(tempfile.gettempdir()) / "mmalign-logs")
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"mmalign-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text(f"argv: {argv!r}\n\n{traceback.format_exc()}")
    return path


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit does not hit the closed pipe again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor (a captured stream): nothing will be flushed to a pipe
        pass


def _interrupted(command: str) -> int:
    print(f"mmalign {command}: interrupted", file=sys.stderr)
    return 130


def _internal_error(command: str, err: BaseException, argv: list[str]) -> int:
    """Exit 3, always with a log: the traceback and the command line."""
    from mmalign.trainers.loop import TrainingError

    try:
        where = f"traceback in {write_crash_log(command, argv)}"
    except OSError as log_err:
        where = f"could not write a log: {log_err}"
    if isinstance(err, TrainingError):
        print(f"mmalign {command}: training stopped: {_one_line(err)} ({where})", file=sys.stderr)
    else:
        print(
            f"mmalign {command}: internal error: {type(err).__name__}: {_one_line(err, 300)} ({where})",
            file=sys.stderr,
        )
    return 3


def main(argv: list[str] | None = None) -> int:
    from mmalign.commands.options import interrupted, watch_interrupts
    from mmalign.config import ConfigError
    from mmalign.data.images import DataError

    args = build_parser().parse_args(argv)
    try:
        with watch_interrupts():
            code = args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, as a shell reports it (train says what it saved itself)
        code = _interrupted(args.command)
    except BrokenPipeError:  # `mmalign ... | head`: the reader left; nothing to report to it
        _silence_stdout()
        code = 141
    except SystemExit:
        raise
    except BaseException as err:
        if (
            interrupted()
        ):  # what Ctrl-C broke on its way (an import it cut short fails later in its own words)
            code = _interrupted(args.command)
        elif isinstance(err, (ConfigError, DataError, ImportError)):
            # the user's input (one line naming the file, key or row), or an optional dependency the config asks
            # for (the message names the pip extra)
            print(f"mmalign {args.command}: error: {_one_line(err)}", file=sys.stderr)
            code = 2
        else:
            code = _internal_error(args.command, err, sys.argv if argv is None else argv)
    if __name__ == "__main__" or argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
