"""``mmalign train | validate | ls | cp``: run a recipe, check it, list what is registered, copy a shipped recipe.

Recipes ship inside the package (``mmalign/configs``; the repository's top-level ``configs`` is a link to it), so
a wheel install has them and ``mmalign train toy/quickstart.yaml`` works from any directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mmalign.commands.options import configs_root, resolve_recipe, shipped_configs


def cmd_train(args: argparse.Namespace) -> int:
    from mmalign.pipelines.runtime import quiet_libraries
    from mmalign.trainers import load_config
    from mmalign.trainers.loop import TrainingStopped, train

    cfg = load_config(resolve_recipe(args.config), args.overrides)
    try:
        with quiet_libraries(
            not args.verbose, python_warnings=False
        ):  # no library loading bars unless --verbose
            result = train(cfg)
    except (
        TrainingStopped
    ) as stop:  # a signal: the checkpoint is saved; 128 + signal number, as a shell reports
        print(f"mmalign train: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the steps began (during them it is a TrainingStopped)
        print("mmalign train: interrupted before the first step; nothing to save", file=sys.stderr)
        return 130
    if "error" in result.summary.get("push_to_hub", {}):  # trained and exported; the upload alone failed
        return 3
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    """Copy a shipped recipe to edit it (as torchtune's ``tune cp``)."""
    import shutil

    from mmalign.config import ConfigError

    root = configs_root()
    name = args.recipe if args.recipe.endswith((".yaml", ".yml")) else args.recipe + ".yaml"
    name = name[len("configs/") :] if name.startswith("configs/") else name
    source = root / name
    if not source.is_file():
        names = [p.relative_to(root).as_posix() for p in shipped_configs()]
        raise ConfigError(f"no shipped recipe {args.recipe!r}; `mmalign ls` lists them: {', '.join(names)}")
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and not args.force:
        raise ConfigError(f"{dest} exists; pass --force to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    print(f"copied {source.relative_to(root)} to {dest}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from mmalign.config import ConfigError, short, to_dict
    from mmalign.pipelines import FAMILIES
    from mmalign.trainers import check_training_run, load_config

    cfg = load_config(resolve_recipe(args.config), args.overrides)
    if cfg.model.family != "auto" and cfg.model.family not in FAMILIES:
        raise ConfigError(
            f"{args.config}: model.family={short(cfg.model.family)}: use auto or one of {', '.join(FAMILIES)}"
        )
    try:
        check_training_run(cfg)
    except ConfigError as err:
        raise ConfigError(f"{args.config}: {err}") from None
    if args.print:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    from mmalign.trainers import get_method
    from mmalign.trainers.loop import trains_what

    for note in missing_paths(cfg):
        print(f"note: {note}", file=sys.stderr)
    print(
        f"{args.config}: OK ({cfg.method.name}, model {cfg.model.pretrained}, "
        f"{trains_what(cfg, get_method(cfg.method.name))}, {cfg.train.max_steps} steps)"
    )
    return 0


def missing_paths(cfg: Any) -> list[str]:
    """The recipe's model and data that are neither here nor shaped like a Hub id: notes, not errors (a recipe is
    often checked on another machine than the one that trains, as the shipped ones name /data/pickapic_v2)."""
    import re

    from mmalign.pipelines import resolve_pretrained

    hub_id = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name
    notes = []
    for key, value in (("model.pretrained", cfg.model.pretrained), ("data.source", cfg.data.source)):
        local = Path(resolve_pretrained(str(value))) if key == "model.pretrained" else Path(str(value))
        if value and not local.exists() and not hub_id.match(str(value).split("[")[0]):
            notes.append(
                f"{key}={value} is not here and is not a Hub id (owner/name): a path on another machine?"
            )
        elif (
            value
            and not local.exists()
            and Path(str(value)).suffix in (".jsonl", ".json", ".csv", ".parquet")
        ):
            notes.append(f"{key}={value} is not here (a file name, not a Hub id)")
    return notes


def cmd_ls(args: argparse.Namespace) -> int:
    from mmalign.pipelines import FAMILIES
    from mmalign.trainers import METHODS

    if args.keys:
        return print_keys(args.keys)

    print("methods:")
    for name, method in METHODS.items():
        print(f"  {name:16s} {method.summary}")
    from mmalign.personalize.encoders import ENCODER_SUMMARIES

    print("user encoders (mmalign personalize embed --encoder):")
    for name, summary in ENCODER_SUMMARIES.items():
        print(f"  {name:16s} {summary}")
    print("pipeline families:")
    for name, spec in FAMILIES.items():
        print(
            f"  {name:16s} {spec.pipeline_class_name} ({spec.noise_process}{', video' if spec.video else ''})"
        )
    from mmalign.rewards import describe_rewards

    print("rewards:")
    for name, description in describe_rewards():
        print(f"  {name:22s} {description}")
    root = configs_root()
    print("configs (copy one with `mmalign cp NAME DEST`):")
    for path in shipped_configs():
        print(f"  {path.relative_to(root.parent).as_posix()}")
    return 0


def print_keys(method: str) -> int:
    """Every config key with its default and help string (the method section for ``method``)."""
    from mmalign.config import ConfigError, DataConfig, LoraConfig, ModelConfig, TrainConfig, describe, short
    from mmalign.trainers import METHODS, get_method

    if method not in METHODS:
        raise ConfigError(f"ls --keys {short(method)}: not a method; known: {', '.join(METHODS)}")
    sections = [
        ("model", ModelConfig),
        ("method", get_method(method).config_cls),
        ("data", DataConfig),
        ("lora", LoraConfig),
        ("train", TrainConfig),
    ]
    for section, cls in sections:
        print(f"{section}:")
        for key, default, help_text in describe(cls, f"{section}."):
            print(f"  {key} = {default!r}\n      {help_text}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a method from a YAML recipe (key=value overrides after it)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="e.g. train.max_steps=2000 method.beta=5000")
    p.add_argument("--verbose", action="store_true", help="show library loading bars and info messages")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="load and check a recipe without training")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--print", action="store_true", help="print the resolved config")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("ls", help="list methods, pipeline families, rewards and shipped configs")
    p.add_argument(
        "--keys",
        metavar="METHOD",
        nargs="?",
        const="diffusion_dpo",
        help="instead, list every config key with default and help (method section of METHOD)",
    )
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser(
        "cp", help="copy a shipped recipe to edit it, e.g. `mmalign cp sdxl/diffusion_dpo_lora.yaml my.yaml`"
    )
    p.add_argument(
        "recipe",
        help="recipe as `mmalign ls` prints it (configs/toy/quickstart.yaml, toy/quickstart.yaml or toy/quickstart)",
    )
    p.add_argument("dest", help="destination file or directory")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_cp)
