"""``mmalign score`` and ``mmalign label`` subcommands; ``mmalign/cli.py`` calls :func:`register`.

Examples::

    mmalign score samples/ --reward pickscore --reward aesthetic --out scores.jsonl
    mmalign score pairs.jsonl --reward configs/rewards/hybrid_image.yaml --out pair_scores.csv
    mmalign label --scores scores.jsonl --key pickscore --strategy best_worst --out pairs.jsonl
    mmalign label candidates/ --reward pickscore --strategy curriculum --margin 0.5 --out pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mmalign.rewards import Reward, RewardSpec


def _parse_kwargs(items: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--reward-arg {item!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def build_rewards(names: list[str], reward_args: list[str] | None = None) -> dict[str, Reward]:
    """Rewards from ``--reward`` values: registry names, ``module:function`` paths or YAML/JSON spec files.

    ``--reward-arg key=value`` (YAML values) go to every named (non-file) reward.
    """
    from mmalign.rewards.score import build_named_rewards, load_reward_config

    kwargs = _parse_kwargs(reward_args or [])
    out: dict[str, Reward] = {}
    specs = []
    for name in names:
        path = Path(name)
        if path.suffix.lower() in (".yaml", ".yml", ".json") and path.is_file():
            out.update(load_reward_config(path))
        else:
            specs.append(RewardSpec(name=name, kwargs=dict(kwargs)))
    out.update(build_named_rewards(specs))
    return out


def _cmd_score(args: argparse.Namespace) -> int:
    from mmalign.rewards.score import collect_items, score_items

    try:
        items = collect_items(args.source)
        rewards = build_rewards(args.reward, args.reward_arg)
    except (ValueError, KeyError) as e:
        print(f"mmalign score: {e}", file=sys.stderr)
        return 2
    summary = score_items(items, rewards, args.out, batch_size=args.batch_size, resume=not args.no_resume,
                          progress=not args.quiet)
    print(json.dumps({"out": str(summary.out), "items": summary.total, "scored": summary.scored,
                      "skipped_already_scored": summary.skipped, "errors": summary.errors}))
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    from mmalign.rewards.label import label_scores
    from mmalign.rewards.score import collect_items, score_items

    out = Path(args.out)
    try:
        if args.scores:
            scores = Path(args.scores)
            key = args.key
        else:
            if not args.source or not args.reward:
                print("mmalign label: give --scores FILE, or a SOURCE folder/manifest with --reward", file=sys.stderr)
                return 2
            rewards = build_rewards(args.reward, args.reward_arg)
            if len(rewards) != 1 and not args.key:
                print(f"mmalign label: rewards {list(rewards)}: pick the ranking one with --key", file=sys.stderr)
                return 2
            scores = out.with_name(out.stem + ".scores.jsonl")
            score_items(collect_items(args.source), rewards, scores, batch_size=args.batch_size,
                        progress=not args.quiet)
            key = args.key or next(iter(rewards))
        summary = label_scores(scores, out, key=key, strategy=args.strategy, margin=args.margin)
    except (ValueError, KeyError) as e:
        print(f"mmalign label: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), "prompts": summary.prompts, "pairs": summary.pairs,
                      "dropped_ties": summary.ties, "prompts_with_one_candidate": summary.singletons,
                      "unscored_candidates": summary.unscored}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``score`` and ``label`` subcommands to the ``mmalign`` parser."""
    score = subparsers.add_parser("score", help="Score a folder, manifest or pair dataset with rewards -> JSONL/CSV.",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    score.add_argument("source", help="Folder of media, a JSONL/CSV manifest, or a pair manifest (chosen/rejected).")
    score.add_argument("--reward", action="append", required=True,
                       help="Registry name, package.module:function, or a YAML/JSON reward spec file. Repeatable.")
    score.add_argument("--reward-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="Keyword argument (YAML value) for the named rewards, e.g. device=cuda. Repeatable.")
    score.add_argument("--out", required=True, help="Output .jsonl or .csv (one row per item).")
    score.add_argument("--batch-size", type=int, default=16, help="Items decoded and scored together.")
    score.add_argument("--no-resume", action="store_true", help="Rescore everything instead of skipping scored rows.")
    score.add_argument("--quiet", action="store_true", help="No progress bar.")
    score.set_defaults(func=_cmd_score)

    label = subparsers.add_parser("label", help="Make preference pairs from N scored candidates per prompt.",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    label.add_argument("source", nargs="?", help="Candidates (folder or manifest) to score first with --reward.")
    label.add_argument("--scores", help="An existing `mmalign score` output to label instead of scoring.")
    label.add_argument("--reward", action="append", default=[], help="Reward(s) to score SOURCE with (see score).")
    label.add_argument("--reward-arg", action="append", default=[], metavar="KEY=VALUE", help="Reward kwargs.")
    label.add_argument("--key", help="Score column that ranks candidates (default: the only reward).")
    label.add_argument("--strategy", choices=["best_worst", "margin", "curriculum"], default="best_worst",
                       help="best_worst: one pair per prompt; margin: all pairs above --margin; "
                            "curriculum: margin pairs ordered easy-to-hard (Curry-DPO).")
    label.add_argument("--margin", type=float, default=0.0, help="Pairs whose score gap is not above this are ties.")
    label.add_argument("--out", required=True, help="Output pair manifest (.jsonl) for `mmalign train`.")
    label.add_argument("--batch-size", type=int, default=16, help="Scoring batch size.")
    label.add_argument("--quiet", action="store_true", help="No progress bar.")
    label.set_defaults(func=_cmd_label)
