"""``mmalign label``: turn N scored candidates per prompt into preference pairs (the AI-feedback route).

Strategies (per prompt, candidates ranked by one score column):

- ``best_worst``: the best against the worst candidate (Diffusion-DPO's AI-feedback setting).
- ``margin``: every pair whose score difference is above the margin.
- ``curriculum``: the ``margin`` pairs ordered easy-to-hard (Curry-DPO, Pattnaik et al. 2024, arXiv
  2403.07230): within a prompt pairs are ranked by decreasing margin and get ``stage`` 0, 1, ...; rows are
  written stage by stage (all prompts' easiest pairs first), largest margin first within a stage.

A pair whose margin is not above ``margin`` is a tie: dropped and counted. The output is the pair manifest
``mmalign train`` reads: JSONL rows ``{"prompt", "chosen", "rejected", "margin"}`` (+ ``stage``), media paths
relative to the manifest, written atomically.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.rewards.score import read_settings, read_table, write_rows

STRATEGIES = ("best_worst", "margin", "curriculum")
MANIFEST_KEYS = (
    "negative_prompt",
    "seed",
    "guidance",
    "steps",
    "model",
    "lora",
    "kind",
    "group",
    "negative_lora",
    # the settings `generate` records beside each sample (commands/generate.py), never scores
    "height",
    "width",
    "num_frames",
    "fps",
    "guidance_2",
    "npo_alpha",
    "npo_beta",
    "user_adapter",
    "user_shots",
    "user",
    "user_scale",
)


@dataclass
class LabelSummary:
    """Counts of a labelling run.

    Attributes:
        prompts: Distinct prompts seen.
        pairs: Pairs written.
        ties: Pairs dropped because their margin was not above the threshold.
        singletons: Prompts with fewer than two scored candidates (no pair possible).
        unscored: Candidates without a usable score (error rows, NaN).
    """

    prompts: int = 0
    pairs: int = 0
    ties: int = 0
    singletons: int = 0
    unscored: int = 0


def make_pairs(
    candidates: dict[str, list[tuple[str, float]]],
    strategy: str = "best_worst",
    margin: float = 0.0,
    prompts: dict[str, str] | None = None,
) -> tuple[list[dict[str, Any]], LabelSummary]:
    """Build preference pairs from scored candidates; a pair never crosses prompt groups.

    Args:
        candidates: prompt group -> [(media path, score), ...] (the group is the prompt unless a manifest says).
        strategy: ``best_worst``, ``margin`` or ``curriculum``.
        margin: Minimum score difference; pairs at or below it are ties (dropped, counted).
        prompts: group -> prompt text, where a group id is not the prompt itself (pairs then carry ``group``).

    Returns:
        (pairs ``{"prompt", "chosen", "rejected", "margin"[, "stage"]}``, summary).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: use one of {STRATEGIES}")
    summary = LabelSummary(prompts=len(candidates))
    pairs: list[dict[str, Any]] = []
    for group, cands in candidates.items():
        prompt = (prompts or {}).get(group, group)
        if len(cands) < 2:
            summary.singletons += 1
            continue
        ranked = sorted(cands, key=lambda c: c[1], reverse=True)  # stable: earlier file wins exact ties
        if strategy == "best_worst":
            candidate_pairs = [(ranked[0], ranked[-1])]
        else:
            candidate_pairs = list(itertools.combinations(ranked, 2))
        kept = []
        for hi, lo in candidate_pairs:
            diff = hi[1] - lo[1]
            if diff <= margin:
                summary.ties += 1
                continue
            pair = {"prompt": prompt, "chosen": hi[0], "rejected": lo[0], "margin": diff}
            if group != prompt:
                pair["group"] = group
            kept.append(pair)
        if strategy == "curriculum":
            kept.sort(key=lambda p: -p["margin"])
            for stage, pair in enumerate(kept):
                pair["stage"] = stage
        pairs.extend(kept)
    if strategy == "curriculum":
        pairs.sort(key=lambda p: (p["stage"], -p["margin"]))
    summary.pairs = len(pairs)
    return pairs, summary


def candidates_from_scores(
    rows: Sequence[dict[str, Any]], key: str, base_dir: str | Path
) -> tuple[dict[str, list[tuple[str, float]]], int, dict[str, str]]:
    """Group score rows (from ``mmalign score``) by prompt group (``group`` column, else the prompt).

    Args:
        rows: Score rows with ``prompt``, ``path``, the ``key`` column and optionally ``group``.
        key: Score column to rank by.
        base_dir: Directory the rows' paths are relative to (the scores file's).

    Returns:
        (group -> [(absolute path, score)], number of rows without a usable score, group -> prompt).

    Raises:
        ValueError: when one group holds different prompts (its candidates would not be comparable).
    """
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(
            f"score row {bad + 1}: expected an object with prompt, path and score columns, got "
            f"{type(rows[bad]).__name__}"
        )
    if rows and not any(key in r for r in rows):
        columns = sorted({k for r in rows for k in r} - {"id", "prompt", "path", "error"})
        raise ValueError(f"score column {key!r} not found; columns: {columns}")
    groups: dict[str, list[tuple[str, float]]] = {}
    prompts: dict[str, str] = {}
    unscored = 0
    for i, r in enumerate(rows):
        if isinstance(r.get(key), list):  # a video reward with segment_seconds/segment_frames: [S] per clip
            scalar = sorted(
                k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            )
            raise ValueError(
                f"score row {i + 1}: column {key!r} holds one score per segment ({len(r[key])} values), and label "
                f"ranks each candidate on one number: pick a per-clip column with --key (this row's: {scalar}), "
                "or score without segment_seconds/segment_frames; per-segment labels go to DenseDPO through "
                "`mmalign label-video --structural` or `mmalign annotate`"
            )
        try:
            value = float(r.get(key))  # CSV gives strings
        except (TypeError, ValueError):
            value = math.nan
        if r.get("error") or math.isnan(value) or not r.get("path"):
            unscored += 1
            continue
        prompt = str(r.get("prompt", ""))
        group = str(r.get("group") or prompt)
        if prompts.setdefault(group, prompt) != prompt:
            raise ValueError(
                f"group {group!r} holds two prompts ({prompts[group]!r} and {prompt!r}); "
                "a group must be the candidates of one prompt"
            )
        groups.setdefault(group, []).append((str(Path(base_dir) / str(r["path"])), value))
    return groups, unscored, {g: p for g, p in prompts.items() if g != p}


def write_manifest(pairs: Sequence[dict[str, Any]], out: str | Path) -> Path:
    """Write pairs as a JSONL manifest with media paths relative to it (atomic)."""
    out = Path(out)
    base = out.parent.resolve()
    rows = []
    for p in pairs:
        row = dict(p)
        for side in ("chosen", "rejected"):
            row[side] = Path(os.path.relpath(Path(p[side]).resolve(), base)).as_posix()
        rows.append(row)
    write_rows(out, rows)
    return out


def label_scores(
    scores: str | Path,
    out: str | Path,
    *,
    key: str | None = None,
    strategy: str = "best_worst",
    margin: float = 0.0,
) -> LabelSummary:
    """Read a scores file, make pairs and write the manifest.

    Args:
        scores: JSONL/CSV written by ``mmalign score``.
        out: Output manifest (``.jsonl``).
        key: Score column (default: the only reward column; required when there are several).
        strategy: See :func:`make_pairs`.
        margin: Tie threshold.
    """
    scores = Path(scores)
    rows = read_table(scores)
    if any(not isinstance(r, dict) for r in rows):
        raise ValueError(f"{scores}: every row must be an object with prompt, path and score columns")
    if key is None:
        present = {k for r in rows if isinstance(r, dict) for k in r}
        scored = read_settings(scores.with_name(scores.name + ".settings.json"))  # the rewards score wrote
        columns = sorted(
            present & set(scored) or present - {"id", "prompt", "path", "error"} - set(MANIFEST_KEYS)
        )
        top = [c for c in columns if "." not in c]
        if len(top) != 1:
            raise ValueError(f"{scores} has score columns {top}: pick one with --key")
        key = top[0]
    try:
        groups, unscored, prompts = candidates_from_scores(rows, key, scores.parent)
    except ValueError as err:
        raise ValueError(f"{scores}: {err}") from None
    pairs, summary = make_pairs(groups, strategy, margin, prompts)
    summary.unscored = unscored
    write_manifest(pairs, out)
    return summary
