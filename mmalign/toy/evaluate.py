"""``mmalign eval``: compare two models on paired seeds under a reward suite (DESIGN §5, §6).

Model A (the one under test, e.g. the tuned LoRA) and model B (the baseline, e.g. the base) draw one image
each per (prompt, seed) from the same initial noise; every reward scores both. Per reward we report

- ``win_rate``: P(A > B) + 0.5 P(A == B) over the paired samples (ties count half),
- ``win_rate_ci``: a paired bootstrap 95% percentile interval of it (resampling prompt/seed pairs),
- ``mean_reward_a``, ``mean_reward_b``, ``mean_diff`` (A - B) and its bootstrap interval.

Both models' images are scored in one call, so rewards that normalise within a batch (a z-scored hybrid)
put A and B on one scale. The first reward of the suite is the primary one whose numbers are also written
at the top level of ``metrics.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmalign.rewards.score import SetScores

Reward = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


def paired_stats(
    scores_a: torch.Tensor | Sequence[float],
    scores_b: torch.Tensor | Sequence[float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    tie_tol: float = 1e-6,
) -> dict[str, Any]:
    """Win rate of A over B on paired scores, with paired-bootstrap 95% intervals.

    Args:
        scores_a: [N] scores of model A.
        scores_b: [N] scores of model B on the same prompts and seeds.
        n_boot: bootstrap resamples.
        seed: bootstrap seed (the interval is reproducible).
        tie_tol: |a - b| <= tie_tol counts as a tie (0.5); the default absorbs float noise between
            numerically identical samples.

    Returns:
        ``n``, ``win_rate``, ``win_rate_ci`` [low, high], ``wins``/``ties``/``losses`` (counts),
        ``mean_reward_a``, ``mean_reward_b``, ``mean_diff`` and ``mean_diff_ci``.
    """
    a = torch.as_tensor(scores_a, dtype=torch.float64).flatten()
    b = torch.as_tensor(scores_b, dtype=torch.float64).flatten()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"paired scores need the same non-zero length, got {a.numel()} and {b.numel()}")
    diff = a - b
    outcome = torch.where(diff.abs() <= tie_tol, 0.5, (diff > 0).double())
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(a), (n_boot, len(a)), generator=g)
    boot_win = outcome[idx].mean(dim=1)
    boot_diff = diff[idx].mean(dim=1)
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    return {
        "n": len(a),
        "win_rate": outcome.mean().item(),
        "win_rate_ci": torch.quantile(boot_win, q).tolist(),
        "wins": int((outcome == 1).sum()),
        "ties": int((outcome == 0.5).sum()),
        "losses": int((outcome == 0).sum()),
        "mean_reward_a": a.mean().item(),
        "mean_reward_b": b.mean().item(),
        "mean_diff": diff.mean().item(),
        "mean_diff_ci": torch.quantile(boot_diff, q).tolist(),
    }


def score_pair(
    rewards: Mapping[str, Reward], images_a: torch.Tensor, images_b: torch.Tensor, prompts: Sequence[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Score A's and B's images [N,...] in one call per reward; returns name -> (scores_a [N], scores_b [N]).

    One call, so even a reward that normalises within its batch measures both sides on one scale.
    ``mmalign eval`` streams instead (:class:`~mmalign.rewards.score.SetScores`), for batch-invariant rewards.
    """
    scores = SetScores(rewards)
    scores.add(torch.cat([images_a, images_b]), list(prompts) * 2)
    return split_pair(scores.result(), len(prompts))


def split_pair(totals: Mapping[str, torch.Tensor], n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Scores of A's n items then B's n -> name -> (scores_a [n], scores_b [n]); a clip's segments averaged."""
    out = {}
    for name, scores in totals.items():
        if len(scores) != 2 * n:
            raise ValueError(f"{name}: {len(scores)} scores for {n} pairs")
        if scores.dim() > 1:  # per-segment video scores: the clip score is their mean
            scores = scores.mean(dim=tuple(range(1, scores.dim())))
        out[name] = (scores[:n], scores[n:])
    return out


def compare_scores(
    scores: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Metrics for a reward suite: the first reward's numbers at top level, every reward under ``rewards``.

    Returns:
        ``{"primary", "n", "win_rate", "win_rate_ci", "mean_reward_a": {name: mean}, "mean_reward_b": {...},
        "mean_diff": {...}, "rewards": {name: paired_stats(...)}}``.
    """
    if not scores:
        raise ValueError("compare_scores needs at least one reward")
    per = {name: paired_stats(a, b, n_boot=n_boot, seed=seed) for name, (a, b) in scores.items()}
    primary = next(iter(per))
    return {
        "primary": primary,
        "n": per[primary]["n"],
        "win_rate": per[primary]["win_rate"],
        "win_rate_ci": per[primary]["win_rate_ci"],
        "mean_reward_a": {k: v["mean_reward_a"] for k, v in per.items()},
        "mean_reward_b": {k: v["mean_reward_b"] for k, v in per.items()},
        "mean_diff": {k: v["mean_diff"] for k, v in per.items()},
        "rewards": per,
    }


def markdown_table(metrics: Mapping[str, Any], label_a: str = "A", label_b: str = "B") -> str:
    """A markdown table, one row per reward: means, difference, win rate and its interval."""
    lines = [
        f"| reward | mean {label_a} | mean {label_b} | diff ({label_a} - {label_b}) [95% CI] | "
        f"win rate {label_a} vs {label_b} [95% CI] | W/T/L |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in metrics["rewards"].items():
        star = " (primary)" if name == metrics["primary"] else ""
        lo, hi = s["mean_diff_ci"]
        wlo, whi = s["win_rate_ci"]
        lines.append(
            f"| {name}{star} | {s['mean_reward_a']:.4f} | {s['mean_reward_b']:.4f} | "
            f"{s['mean_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] | {s['win_rate']:.3f} [{wlo:.3f}, {whi:.3f}] | "
            f"{s['wins']}/{s['ties']}/{s['losses']} |"
        )
    return (
        "\n".join(lines) + f"\n\nn = {metrics['n']} paired samples (same prompt and seed for both models).\n"
    )


def flaw_rates(flags_a: torch.Tensor, flags_b: torch.Tensor, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Rate of a flaw (a boolean per sample, e.g. ``toy_defect < 0.5``) for A and B on the same samples.

    Returns:
        ``rate_a``, ``rate_b``, ``drop`` (rate_b - rate_a), its paired-bootstrap 95% interval ``drop_ci``,
        ``fixed`` (flawed in B, clean in A) and ``broken`` (clean in B, flawed in A) counts.
    """
    a = torch.as_tensor(flags_a, dtype=torch.float64).flatten()
    b = torch.as_tensor(flags_b, dtype=torch.float64).flatten()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"paired flaw flags need the same non-zero length, got {a.numel()} and {b.numel()}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(a), (n_boot, len(a)), generator=g)
    boot = (b[idx] - a[idx]).mean(dim=1)
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    return {
        "rate_a": a.mean().item(),
        "rate_b": b.mean().item(),
        "drop": (b - a).mean().item(),
        "drop_ci": torch.quantile(boot, q).tolist(),
        "fixed": int(((b == 1) & (a == 0)).sum()),
        "broken": int(((b == 0) & (a == 1)).sum()),
    }


def flaw_table(flaws: Mapping[str, Mapping[str, Any]], label_a: str = "A", label_b: str = "B") -> str:
    """A markdown table of :func:`flaw_rates` results, one row per flaw."""
    lines = [
        f"| flaw rate | {label_b} | {label_a} | drop [95% CI] | fixed / broken |",
        "|---|---|---|---|---|",
    ]
    for name, f in flaws.items():
        lo, hi = f["drop_ci"]
        lines.append(
            f"| {name} | {f['rate_b']:.1%} | {f['rate_a']:.1%} | {f['drop']:+.1%} [{lo:+.1%}, {hi:+.1%}] | "
            f"{f['fixed']} / {f['broken']} |"
        )
    return "\n".join(lines) + "\n"


def paired_grid(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    *,
    n: int = 32,
    per_row: int = 8,
    scale: int = 4,
    labels: tuple[str, str] = ("A", "B"),
    prompts: Sequence[str] = (),
    captions_a: Sequence[str] = (),
    captions_b: Sequence[str] = (),
):
    """Labelled grid of matched samples: rows alternate B (named ``labels[1]``) and A (``labels[0]``) below it,
    same prompt and seed per column; with ``prompts`` (one per sample) each row name also shows the prompt of
    its first sample (rows of one prompt each when ``per_row`` = seeds per prompt). ``captions_a`` /
    ``captions_b`` (one per sample, e.g. the score) are written under each tile."""
    from mmalign.trainers.report import labelled_grid

    n = min(n, len(images_a))
    rows, names, caps = [], [], []
    for start in range(0, n, per_row):
        stop = min(n, start + per_row)
        rows += [images_b[start:stop], images_a[start:stop]]
        caps += [list(captions_b[start:stop]), list(captions_a[start:stop])]
        prompt = f": {prompts[start]}" if start < len(prompts) else ""
        names += [f"{labels[1]}{prompt}", labels[0]]
    return labelled_grid(rows, row_names=names, scale=scale, captions=caps if any(caps) else ())


def evaluate_models(
    pipe_a,
    pipe_b,
    prompts: Sequence[str],
    seeds: Sequence[int],
    rewards: Mapping[str, Reward],
    out_dir: str | Path,
    *,
    guidance_scale: float = 1.0,
    steps: int = 20,
    size: int = 32,
    label_a: str = "A",
    label_b: str = "B",
    n_boot: int = 2000,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Generate with both pipelines on paired (prompt, seed), score, and write the report files.

    Writes ``metrics.json``, ``table.md`` and ``grid.png`` (B above A, matched) into ``out_dir``.

    Returns:
        The metrics dict (see :func:`compare_scores`), plus ``labels`` and sampling settings.
    """
    from mmalign.toy.sample import generate

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(guidance_scale=guidance_scale, steps=steps, size=size)
    log(f"eval: sampling {len(prompts)} images from {label_a}")
    images_a = generate(pipe_a, prompts, seeds, progress=f"eval {label_a}", **kwargs)
    log(f"eval: sampling {len(prompts)} images from {label_b}")
    images_b = generate(pipe_b, prompts, seeds, progress=f"eval {label_b}", **kwargs)
    scores = score_pair(rewards, images_a, images_b, prompts)
    metrics = compare_scores(scores, n_boot=n_boot)
    metrics.update(labels={"a": label_a, "b": label_b}, guidance_scale=guidance_scale, steps=steps)
    write_eval_report(
        metrics, images_a, images_b, out_dir, label_a=label_a, label_b=label_b, prompts=prompts, scores=scores
    )
    return metrics


def write_eval_report(
    metrics,
    images_a,
    images_b,
    out_dir: str | Path,
    *,
    label_a: str = "A",
    label_b: str = "B",
    prompts: Sequence[str] = (),
    scores: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    columns: int = 8,
):
    """``metrics.json``, ``table.md`` and ``grid.png`` into ``out_dir``.

    The grid is labelled: one column per (prompt, seed) titled with the prompt, row B on top named ``label_b``,
    row A below it named ``label_a``, each tile captioned with its primary-reward score; small images are
    upscaled. Videos show their first frame.
    """
    from mmalign.trainers.report import labelled_grid

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (out_dir / "table.md").write_text(markdown_table(metrics, label_a, label_b))
    n = min(columns, len(images_a))
    captions: list[list[str]] = []
    if scores:
        primary = metrics.get("primary", next(iter(scores)))
        a, b = scores[primary]
        short = primary if len(primary) <= 16 else primary[:15] + "."
        captions = [[f"{short} {float(x):.3f}" for x in b[:n]], [f"{short} {float(x):.3f}" for x in a[:n]]]
    grid = labelled_grid(
        [images_b[:n], images_a[:n]],
        row_names=[label_b, label_a],
        column_titles=list(prompts[:n]),
        captions=captions,
    )
    grid.save(out_dir / "grid.png")
