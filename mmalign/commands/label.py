"""``mmalign label``: make preference pairs from N scored candidates per prompt (the AI-feedback route).

Examples::

    mmalign label --scores outputs/scores.jsonl --key pickscore --strategy best_worst --out outputs/pairs.jsonl
    mmalign label outputs/candidates --reward pickscore --device cuda --out outputs/pairs.jsonl

Candidates are paired only within their prompt group (the manifest's ``group``, else the prompt). With
``--strategy curriculum`` pairs are written easy-to-hard; train on them in file order with ``data.shuffle=false``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmalign.commands.options import finite_float, one_line_errors


def label(
    out: str | Path,
    *,
    scores: str | Path | None = None,
    source: str | Path | None = None,
    rewards: list[str] | None = None,
    reward_args: list[str] | None = None,
    key: str | None = None,
    strategy: str = "best_worst",
    margin: float = 0.0,
    allow_empty_prompt: bool = False,
    normalize_over: str | None = None,
    video_fps: float | None = None,
    video_frames: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 16,
    verbose: bool = False,
    progress: bool = True,
    cpu_offload: bool = False,
):
    """Label an existing scores file, or score ``source`` with ``rewards`` first (into ``<out>.scores.jsonl``).

    Returns:
        :class:`mmalign.rewards.label.LabelSummary`.
    """
    from mmalign.commands.options import check_out, check_table
    from mmalign.commands.score import build_rewards, score, scoring_settings
    from mmalign.rewards.label import label_scores

    out = Path(out)
    check_out(out)
    if scores is not None:
        check_table(scores, must_exist=True)
        if out.resolve() == Path(scores).resolve():
            raise ValueError(
                f"--out {out} is the --scores file: the pairs would replace the scores; choose another"
            )
    if scores is None:
        if not source or not rewards:
            raise ValueError("give --scores FILE, or a SOURCE folder/manifest with --reward")
        built = build_rewards(list(rewards), reward_args, device=device, dtype=dtype)
        if len(built) != 1 and not key:
            raise ValueError(f"rewards {list(built)}: pick the ranking one with --key")
        scores = out.with_name(out.stem + ".scores.jsonl")
        score(
            source,
            built,
            scores,
            allow_empty_prompt=allow_empty_prompt,
            normalize_over=normalize_over,
            video_fps=video_fps,
            video_frames=video_frames,
            batch_size=batch_size,
            progress=progress,
            settings=dict.fromkeys(
                built, scoring_settings(list(rewards), reward_args, video_fps, video_frames)
            ),
        )
        key = key or next(iter(built))
    return label_scores(scores, out, key=key, strategy=strategy, margin=margin)


@one_line_errors("label")
def run(args: argparse.Namespace) -> int:
    from mmalign.commands.options import runtime_kwargs
    from mmalign.commands.score import user_reward_args

    summary = label(
        args.out,
        scores=args.scores,
        source=args.source,
        rewards=args.reward,
        reward_args=args.reward_arg + user_reward_args(args),
        key=args.key,
        strategy=args.strategy,
        margin=args.margin,
        allow_empty_prompt=args.allow_empty_prompt,
        normalize_over=args.normalize_over,
        video_fps=args.video_fps,
        video_frames=args.video_frames,
        progress=not args.quiet,
        **runtime_kwargs(args),
    )
    out = Path(args.out)
    if args.user and out.is_file():  # one person's pairs: tag them for `personalize embed` / personal_dpo
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        out.write_text("".join(json.dumps({**r, "user": args.user}) + "\n" for r in rows))
    print(
        json.dumps(
            {
                "out": str(args.out),
                "prompts": summary.prompts,
                "pairs": summary.pairs,
                "dropped_ties": summary.ties,
                "prompts_with_one_candidate": summary.singletons,
                "unscored_candidates": summary.unscored,
            }
        )
    )
    if args.strategy == "curriculum":
        print("curriculum order: train with data.shuffle=false to keep it", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mmalign label``."""
    from mmalign.commands.options import add_runtime_args
    from mmalign.commands.score import add_reward_args

    p = subparsers.add_parser(
        "label",
        help="Make preference pairs from N scored candidates per prompt.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "source", nargs="?", help="Candidates (a `generate` folder or manifest) to score first with --reward."
    )
    p.add_argument("--scores", help="An existing `mmalign score` output to label instead of scoring.")
    add_reward_args(p, required=False)
    p.add_argument("--key", help="Score column that ranks candidates (default: the only reward).")
    p.add_argument(
        "--strategy",
        choices=["best_worst", "margin", "curriculum"],
        default="best_worst",
        help="best_worst: one pair per prompt; margin: all pairs above --margin; "
        "curriculum: margin pairs ordered easy-to-hard (Curry-DPO; train with data.shuffle=false).",
    )
    p.add_argument(
        "--margin", type=finite_float, default=0.0, help="Pairs whose score gap is not above this are ties."
    )
    p.add_argument("--out", required=True, help="Output pair manifest (.jsonl) for `mmalign train`.")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    add_runtime_args(p, batch_size=16, offload=False)
    p.set_defaults(func=run)
