"""Efficacy of a training method on the toy world: the quickstart protocol, one JSON line out.

    python bench/efficacy.py diffusion_dpo [--out DIR] [--model TOY_PIPELINE] [key=value ...]

Runs generate -> score -> pairs -> METHOD (LoRA) -> paired held-out evaluation against the base (see
``mmalign/toy/quickstart.py``) and prints ``{"method", "win_rate", "win_rate_ci", "steps", "seconds", ...}``
(win rate of tuned over base under the training reward, bootstrap 95% interval, n held-out pairs).
The recipe is ``configs/toy/quickstart_<METHOD>.yaml`` or ``configs/toy/<METHOD>.yaml`` when it exists and the
method trains on image pairs (e.g. ``inversion_dpo``), else ``configs/toy/quickstart.yaml`` with ``method.name=METHOD``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def toy_recipe(method: str) -> Path | None:
    """The method's own toy recipe when it trains on the quickstart's image pairs, else None (quickstart.yaml)."""
    from mmalign.trainers import data as method_data
    from mmalign.trainers import get_method

    for config in (
        ROOT / "configs" / "toy" / f"quickstart_{method}.yaml",
        ROOT / "configs" / "toy" / f"{method}.yaml",
    ):
        if config.is_file() and get_method(method).build_data in (
            method_data.image_pairs,
            method_data.inversion_pairs,
        ):
            return config
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["dense_dpo"]:  # toy videos: its own protocol, bench/efficacy_dense_dpo.py
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "efficacy_dense_dpo", Path(__file__).with_name("efficacy_dense_dpo.py")
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", help="a method name from `mmalign ls`, e.g. diffusion_dpo")
    parser.add_argument(
        "--out", default=None, help="report directory (default outputs/bench/efficacy-METHOD)"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="base toy pipeline directory (default the shipped mmalign/toy/assets/toy-sd)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a QuickstartOptions field of the protocol, e.g. candidates=12 (default: the quickstart's)",
    )
    parser.add_argument("--quiet", action="store_true", help="only the JSON line on stdout")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.max_steps=200")
    args = parser.parse_args(argv)

    from mmalign.toy.quickstart import DEFAULT_CONFIG, DEFAULT_TOY_MODEL, FLAWS, QuickstartOptions, quickstart

    overrides = list(args.overrides)
    config = toy_recipe(args.method)
    if config is None:
        config = DEFAULT_CONFIG
        overrides.insert(0, f"method.name={args.method}")
    out = Path(args.out or ROOT / "outputs" / "bench" / f"efficacy-{args.method}")
    t0 = time.time()
    log = (lambda s: print(s, file=sys.stderr)) if not args.quiet else (lambda s: None)
    model = args.model or DEFAULT_TOY_MODEL
    try:
        opts = QuickstartOptions.from_items(args.option)
    except ValueError as err:
        print(f"bench/efficacy.py: --option: {err}")
        return 2
    options = {k: getattr(opts, k) for k in (i.partition("=")[0] for i in args.option)}
    metrics = quickstart(
        out,
        model=model,
        options=opts,
        config=config,
        overrides=[*overrides, "train.progress=false"],
        log=log,
    )
    row = {
        "method": args.method,
        "win_rate": round(metrics["win_rate"], 4),
        "win_rate_ci": [round(x, 4) for x in metrics["win_rate_ci"]],
        "n": metrics["n"],
        "steps": metrics["steps"],
        "seconds": round(time.time() - t0, 1),
        "train_seconds": round(metrics["train_seconds"], 1),
        "mean_reward_tuned": round(metrics["mean_reward_a"]["training_reward"], 4),
        "mean_reward_base": round(metrics["mean_reward_b"]["training_reward"], 4),
        "color_correct_tuned": round(metrics["mean_reward_a"]["toy_color_correct"], 4),
        "color_correct_base": round(metrics["mean_reward_b"]["toy_color_correct"], 4),
        **{
            f"{key}_rate_{side}": round(metrics["flaws"][flaw][f"rate_{ab}"], 4)
            for key, flaw in zip(("speckle", "wrong_colour"), FLAWS)
            for side, ab in (("tuned", "a"), ("base", "b"))
        },
        "options": options,
        "config": str(Path(config).relative_to(ROOT)) if Path(config).is_relative_to(ROOT) else str(config),
    }
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
