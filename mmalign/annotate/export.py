"""Labels file -> training manifest (``annotate export``) and agreement statistics (``annotate stats``).

Export formats (what ``mmalign train`` reads; media paths relative to the output file):

- images: ``{"prompt", "image_0", "image_1", "label_0", "user", "user_id"}`` with ``label_0`` 1 (image_0
  preferred), 0 or 0.5 (tie; ``train`` drops ties by default), read by ``mmalign.data.pairs.load_pairs``;
- videos: ``{"prompt", "video_0", "video_1", "labels", "label", "segment_seconds", "user"}`` with per-segment
  ``labels`` +1/0/-1 relative to video_0, read by ``mmalign.data.segments.load_video_pairs`` (DenseDPO).

``user`` is the annotator id (``user_id`` repeats it: the name the pair reader keeps today). Skips are
dropped. ``majority=True`` writes one row per item instead of one per label: the majority choice (and,
for video, the majority of each segment, a tie where there is none) and drops items without a majority.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmalign.annotate.store import active_labels, read_labels
from mmalign.data.images import DataError

SIGN = {"a": 1, "b": -1, "tie": 0}


def _rel(path: str, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _majority(values: Sequence[Any]) -> Any | None:
    """The value more than half of ``values`` share, else ``None``."""
    if not values:
        return None
    value, n = Counter(values).most_common(1)[0]
    return value if 2 * n > len(values) else None


def _row(
    first: dict[str, Any],
    base: Path,
    choice: str,
    segment_labels: list[int] | None,
    user: str | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    a, b = (_rel(p, base) for p in first["media"])
    if first["kind"] == "video":
        row = {
            "prompt": first["prompt"],
            "video_0": a,
            "video_1": b,
            "labels": segment_labels,
            "label": SIGN[choice],
        }
        if first.get("segment_seconds"):
            row["segment_seconds"] = first["segment_seconds"]
        else:
            row["segments"] = first.get("segments")
    else:
        row = {
            "prompt": first["prompt"],
            "image_0": a,
            "image_1": b,
            "label_0": {"a": 1.0, "b": 0.0, "tie": 0.5}[choice],
        }
    if user is not None:
        row["user"] = user
        row["user_id"] = user
    row.update(extra)
    return row


def export_labels(
    labels: str | Path, out: str | Path, *, majority: bool = False, kind: str | None = None
) -> dict[str, int]:
    """Write the training manifest; returns counts (labels, skips, items, rows, no_majority).

    Args:
        labels: the labels JSONL written by ``annotate serve``.
        out: the manifest to write (paths relative to it).
        majority: one row per item (see the module docstring) instead of one per label.
        kind: ``image`` or ``video``: export only those labels (required when the file holds both, since
            ``train`` reads one kind per manifest).
    """
    records = read_labels(labels)
    if not records:
        raise DataError(f"{labels}: no labels to export")
    active = active_labels(records)
    kinds = {r.get("kind") for r in active}
    if kind is None and len(kinds) > 1:
        raise DataError(
            f"{labels}: holds image and video labels; export each with --kind image / --kind video"
        )
    if kind is not None:
        active = [r for r in active if r.get("kind") == kind]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent.resolve()
    kept = [r for r in active if r["choice"] != "skip"]
    counts = {
        "labels": len(active),
        "skips": len(active) - len(kept),
        "items": len({r["item"] for r in kept}),
        "rows": 0,
        "no_majority": 0,
    }
    rows = []
    if not majority:
        for r in kept:
            rows.append(
                _row(
                    r,
                    base,
                    r["choice"],
                    r.get("segment_labels"),
                    r["annotator"],
                    {"item": r["item"], "elapsed_ms": r.get("elapsed_ms")},
                )
            )
    else:
        by_item: dict[str, list[dict]] = defaultdict(list)
        for r in kept:
            by_item[r["item"]].append(r)
        for item, group in by_item.items():
            choice = _majority([r["choice"] for r in group])
            if choice is None:
                counts["no_majority"] += 1
                continue
            segs = None
            if group[0]["kind"] == "video":
                per_seg = zip(*[r["segment_labels"] for r in group])
                segs = [m if (m := _majority(list(v))) is not None else 0 for v in per_seg]
            rows.append(
                _row(
                    group[0],
                    base,
                    choice,
                    segs,
                    None,
                    {"item": item, "votes": len(group), "users": sorted(r["annotator"] for r in group)},
                )
            )
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out)
    counts["rows"] = len(rows)
    return counts


# ------------------------------------------------------------------------------------------------
# agreement


def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's kappa of two raters over the same units: (p_o - p_e) / (1 - p_e); nan when p_e = 1."""
    if len(a) != len(b) or not a:
        raise ValueError("cohen_kappa needs two equally long, non-empty rating lists")
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    return float("nan") if p_e == 1 else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(table: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa from a units x categories count table, every row summing to the same n >= 2.

    P_i = (sum_j n_ij^2 - n) / (n (n - 1)); P_bar = mean P_i; p_j = sum_i n_ij / (N n); P_e = sum_j p_j^2;
    kappa = (P_bar - P_e) / (1 - P_e) (nan when P_e = 1).
    """
    if not table:
        raise ValueError("fleiss_kappa needs at least one unit")
    n = sum(table[0])
    if n < 2 or any(sum(row) != n for row in table):
        raise ValueError("fleiss_kappa needs the same number (>= 2) of ratings for every unit")
    units = len(table)
    p_bar = sum((sum(x * x for x in row) - n) / (n * (n - 1)) for row in table) / units
    p_j = [sum(row[j] for row in table) / (units * n) for j in range(len(table[0]))]
    p_e = sum(p * p for p in p_j)
    return float("nan") if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def agreement(units: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    """Agreement over units (item or item+segment) -> {annotator: rating}, units with >= 2 ratings.

    Two annotators in all: Cohen's kappa. More: Fleiss' kappa over the units rated by the most common number
    of people (Fleiss needs a fixed count per unit). Always: raw percent agreement over pairs of ratings.
    """
    rated = {u: r for u, r in units.items() if len(r) >= 2}
    people = sorted({p for r in rated.values() for p in r})
    out: dict[str, Any] = {"units": len(rated)}
    if not rated:
        return out
    pairs = agree = 0
    for r in rated.values():
        vals = list(r.values())
        for i in range(len(vals)):
            for j in range(i + 1, len(vals)):
                pairs += 1
                agree += vals[i] == vals[j]
    out["percent_agreement"] = agree / pairs
    if len(people) == 2:
        a, b = people
        out["cohen_kappa"] = cohen_kappa([r[a] for r in rated.values()], [r[b] for r in rated.values()])
        out["raters"] = people
    else:
        k = Counter(len(r) for r in rated.values()).most_common(1)[0][0]
        cats = sorted({v for r in rated.values() for v in r.values()}, key=str)
        table = [[list(r.values()).count(c) for c in cats] for r in rated.values() if len(r) == k]
        out["fleiss_kappa"] = fleiss_kappa(table)
        out["fleiss_units"], out["ratings_per_unit"], out["raters"] = len(table), k, people
    return out


def label_stats(labels: str | Path) -> dict[str, Any]:
    """Counts per person, time per item, agreement between people and with the reward's choice."""
    records = read_labels(labels)
    active = active_labels(records)
    undone = sum(1 for r in records if r["type"] == "undo")
    per_person: dict[str, dict[str, Any]] = {}
    for r in active:
        p = per_person.setdefault(r["annotator"], {"labels": 0, "skips": 0, "ties": 0, "ms": []})
        p["labels"] += 1
        p["skips"] += r["choice"] == "skip"
        p["ties"] += r["choice"] == "tie"
        if isinstance(r.get("elapsed_ms"), int):
            p["ms"].append(r["elapsed_ms"])
    people = {}
    for name, p in sorted(per_person.items()):
        ms = p.pop("ms")
        people[name] = {
            **p,
            "median_s": statistics.median(ms) / 1000 if ms else None,
            "mean_s": statistics.fmean(ms) / 1000 if ms else None,
        }
    all_ms = [r["elapsed_ms"] for r in active if isinstance(r.get("elapsed_ms"), int)]
    kept = [r for r in active if r["choice"] != "skip"]
    items: dict[str, dict[str, str]] = defaultdict(dict)
    segments: dict[tuple[str, int], dict[str, int]] = defaultdict(dict)
    for r in kept:
        items[r["item"]][r["annotator"]] = r["choice"]
        for i, v in enumerate(r.get("segment_labels") or []):
            segments[(r["item"], i)][r["annotator"]] = v
    out: dict[str, Any] = {
        "labels": len(active),
        "undone": undone,
        "items_labelled": len(items),
        "people": people,
        "seconds_per_item": {
            "median": statistics.median(all_ms) / 1000 if all_ms else None,
            "mean": statistics.fmean(all_ms) / 1000 if all_ms else None,
        },
        "labels_per_item": dict(sorted(Counter(len(v) for v in items.values()).items())),
        "agreement": agreement(items),
    }
    if segments:
        out["segment_agreement"] = agreement(segments)
    # the reward's choice: the higher score of a and b (a tie when equal); humans' ties are left out
    with_scores = [r for r in kept if r.get("scores") and r["choice"] != "tie"]
    if with_scores:
        hits: dict[str, list[bool]] = defaultdict(list)
        for r in with_scores:
            sa, sb = r["scores"]
            reward = "a" if sa > sb else "b" if sb > sa else "tie"
            hits[r["annotator"]].append(reward == r["choice"])
        flat = [h for v in hits.values() for h in v]
        out["reward_agreement"] = {
            "labels": len(flat),
            "rate": sum(flat) / len(flat),
            "per_person": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
        }
    return out


def format_stats(stats: dict[str, Any]) -> str:
    """The stats as a few human-readable lines."""

    def num(x: float | None, fmt: str = ".3f") -> str:
        return "n/a" if x is None or x != x else format(x, fmt)

    lines = [
        f"{stats['labels']} labels ({stats['undone']} undone) on {stats['items_labelled']} items; "
        f"labels per item: {stats['labels_per_item']}",
        f"seconds per item: median {num(stats['seconds_per_item']['median'], '.1f')}, "
        f"mean {num(stats['seconds_per_item']['mean'], '.1f')}",
        "per person:",
    ]
    for name, p in stats["people"].items():
        lines.append(
            f"  {name:20s} {p['labels']:5d} labels  {p['skips']:4d} skips  {p['ties']:4d} ties  "
            f"median {num(p['median_s'], '.1f')} s/item"
        )
    for key, title in (
        ("agreement", "agreement (items)"),
        ("segment_agreement", "agreement (video segments)"),
    ):
        a = stats.get(key)
        if not a:
            continue
        if not a.get("units"):
            lines.append(f"{title}: no unit was labelled by two people (use --overlap 2 or more)")
            continue
        line = f"{title}: {a['units']} units, raw {num(a['percent_agreement'])}"
        if "cohen_kappa" in a:
            line += f", Cohen's kappa {num(a['cohen_kappa'])} ({' vs '.join(a['raters'])})"
        if "fleiss_kappa" in a:
            line += (
                f", Fleiss' kappa {num(a['fleiss_kappa'])} ({a['fleiss_units']} units x "
                f"{a['ratings_per_unit']} ratings, {len(a['raters'])} people)"
            )
        lines.append(line)
    r = stats.get("reward_agreement")
    if r:
        per = ", ".join(f"{k} {num(v, '.2f')}" for k, v in r["per_person"].items())
        lines.append(
            f"agreement with the reward's choice: {num(r['rate'])} over {r['labels']} non-tie labels ({per})"
        )
    return "\n".join(lines)
