"""``mmalign train | validate | ls``: run a recipe, check it, list what is registered."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def shipped_configs() -> list[Path]:
    root = Path(__file__).resolve().parent.parent.parent / "configs"
    return sorted(p for p in root.rglob("*.yaml")) if root.is_dir() else []


def cmd_train(args: argparse.Namespace) -> int:
    from mmalign.trainers import load_config
    from mmalign.trainers.loop import TrainingStopped, train

    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg)
    except TrainingStopped as stop:  # a signal: the checkpoint is saved; 128 + signal number, as a shell reports
        print(f"mmalign train: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the steps began (during them it is a TrainingStopped)
        print("mmalign train: interrupted before the first step; nothing to save", file=sys.stderr)
        return 130
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from mmalign.config import to_dict
    from mmalign.trainers import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    print(f"{args.config}: OK ({cfg.method.name}, model {cfg.model.pretrained}, "
          f"{'LoRA r=' + str(cfg.lora.rank) if cfg.lora.enabled else 'full fine-tune'}, {cfg.train.max_steps} steps)")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from mmalign.pipelines import FAMILIES
    from mmalign.trainers import METHODS

    if args.keys:
        return print_keys(args.keys)

    print("methods:")
    for name, method in METHODS.items():
        print(f"  {name:16s} {method.summary}")
    print("pipeline families:")
    for name, spec in FAMILIES.items():
        print(f"  {name:16s} {spec.pipeline_class_name} ({spec.noise_process}{', video' if spec.video else ''})")
    from mmalign.rewards import describe_rewards

    print("rewards:")
    for name, description in describe_rewards():
        print(f"  {name:22s} {description}")
    root = Path(__file__).resolve().parent.parent.parent
    print("configs:")
    for path in shipped_configs():
        print(f"  {path.relative_to(root)}")
    return 0


def print_keys(method: str) -> int:
    """Every config key with its default and help string (the method section for ``method``)."""
    from mmalign.config import DataConfig, LoraConfig, ModelConfig, TrainConfig, describe
    from mmalign.trainers import get_method

    sections = [("model", ModelConfig), ("method", get_method(method).config_cls), ("data", DataConfig),
                ("lora", LoraConfig), ("train", TrainConfig)]
    for section, cls in sections:
        print(f"{section}:")
        for key, default, help_text in describe(cls, f"{section}."):
            print(f"  {key} = {default!r}\n      {help_text}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a method from a YAML recipe (key=value overrides after it)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="e.g. train.max_steps=2000 method.beta=5000")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="load and check a recipe without training")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--print", action="store_true", help="print the resolved config")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("ls", help="list methods, pipeline families, rewards and shipped configs")
    p.add_argument("--keys", metavar="METHOD", nargs="?", const="diffusion_dpo",
                   help="instead, list every config key with default and help (method section of METHOD)")
    p.set_defaults(func=cmd_ls)
