"""``mmalign`` command line: train | validate | ls | cp | generate | score | label | eval | toy | quickstart.

Each subcommand is a function taking the parsed arguments and returning an exit code. Configs errors,
data errors and training errors print one clear line and exit 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, each exposing register(subparsers). Explicit, in the order `--help` lists them.
COMMAND_MODULES = ["mmalign.commands.train", "mmalign.commands.generate", "mmalign.commands.score",
                   "mmalign.commands.label", "mmalign.commands.eval", "mmalign.commands.label_video",
                   "mmalign.commands.cache", "mmalign.toy.cli", "mmalign.commands.annotate"]


def build_parser() -> argparse.ArgumentParser:
    import mmalign

    parser = argparse.ArgumentParser(prog="mmalign", description="Preference-tune diffusers image and video models.")
    parser.add_argument("--version", action="version", version=f"mmalign {mmalign.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mmalign.config import ConfigError
    from mmalign.data.images import DataError

    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (ConfigError, DataError) as err:
        print(f"mmalign {args.command}: error: {err}", file=sys.stderr)
        code = 2
    except Exception as err:
        from mmalign.trainers.loop import TrainingError

        if not isinstance(err, TrainingError):
            raise
        print(f"mmalign {args.command}: training stopped: {err}", file=sys.stderr)
        code = 3
    if __name__ == "__main__" or argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
