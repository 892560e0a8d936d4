"""What annotators label: items (one prompt, two media) read from a pair manifest or a media manifest.

Two manifest shapes are accepted (JSONL or CSV, paths relative to the manifest's folder):

- a **pair manifest**, one row per pair: ``prompt`` with ``chosen``/``rejected``, ``image_0``/``image_1`` or
  ``video_0``/``video_1`` (video rows may carry ``segment_seconds`` or ``segments`` = ``[[start, end], ...]``);
- a **media manifest** (what ``mmalign generate`` writes), one row per candidate: ``path``, ``prompt`` and an
  optional ``group`` (default: the prompt). Pairs are drawn inside each group with a seeded shuffle.

Every file is checked when the manifest is read (exists, decodes; videos: duration), so a bad row stops the
server at start with one line naming it, not an annotator halfway through. Media ``a`` is the item's first
medium (``chosen``/``image_0``/``video_0``); labels are recorded relative to it whatever side it was shown on.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmalign.data.images import DataError, open_image
from mmalign.data.video import decode_frames
from mmalign.utils import TEXT_ENCODING

PAIR_KEYS = (("chosen", "rejected"), ("image_0", "image_1"), ("video_0", "video_1"))
MEDIA_KEYS = ("path", "media", "image", "video", "file")
VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".m4v"}
# keys that are never a reward score
_NOT_SCORES = {
    "seed",
    "guidance",
    "steps",
    "label_0",
    "label",
    "segment_seconds",
    "width",
    "height",
    "fps",
    "frames",
    "num_frames",
    "index",
    "id",
    "row",
}


@dataclass
class Item:
    """One comparison shown to annotators.

    Attributes:
        id: stable id (hash of the prompt and both files), the key labels refer to.
        prompt: the text shown on top.
        media: absolute paths of media a and b.
        kind: ``image`` or ``video``.
        row: where it came from ("manifest.jsonl:3" or "manifest.jsonl:3+7" for a drawn pair).
        columns: the manifest's column names for a and b (``chosen``/``rejected``, ...), kept for export.
        segments: video only: ``[[start, end], ...]`` in seconds.
        segment_seconds: video only: the uniform segment length (``None`` when the manifest gave segments).
        duration: video only: clip length in seconds (the shorter of the two).
        scores: a reward's scores of a and b when the manifest carries them.
    """

    id: str
    prompt: str
    media: tuple[str, str]
    kind: str
    row: str
    columns: tuple[str, str] = ("image_0", "image_1")
    segments: list[list[float]] | None = None
    segment_seconds: float | None = None
    duration: float | None = None
    scores: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The item fields every label carries, so a labels file can be exported without the manifest."""
        return {
            "item": self.id,
            "prompt": self.prompt,
            "kind": self.kind,
            "media": list(self.media),
            "columns": list(self.columns),
            "row": self.row,
            "segments": self.segments,
            "segment_seconds": self.segment_seconds,
            "scores": list(self.scores) if self.scores else None,
        }


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """(``"file:line"``, row) for every row of a JSONL or CSV manifest."""
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    if path.suffix == ".csv":
        with path.open(newline="", encoding=TEXT_ENCODING) as fh:
            return [(f"{path}:{i}", row) for i, row in enumerate(csv.DictReader(fh), start=2)]
    rows = []
    for i, line in enumerate(path.read_text(encoding=TEXT_ENCODING).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{i}: not valid JSON: {err}") from err
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"{path}:{i}", row))
    if not rows:
        raise DataError(f"{path}: the manifest has no rows")
    return rows


def _kind_of(path: Path, row: dict) -> str:
    kind = row.get("kind")
    if kind in ("image", "video"):
        return kind
    return "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"


def check_image(path: Path, where: str) -> None:
    """Decode the image as training does (``open_image``): PIL's ``verify`` passes a truncated JPEG."""
    if not path.is_file():
        raise DataError(f"{where}: file not found: {path}")
    try:
        open_image(path, where=where)
    except DataError as err:
        why = str(err).removeprefix(f"{where}: ").removeprefix("cannot decode image: ")
        raise DataError(f"{where}: cannot decode image {path}: {why}") from None


def video_duration(path: Path, where: str) -> float:
    """Duration in seconds of a video file (container metadata, else frames / rate), after decoding every frame
    as training does (``decode_frames``): metadata alone passes a file cut short after its header."""
    if not path.is_file():
        raise DataError(f"{where}: file not found: {path}")
    try:
        import av
    except ImportError as err:
        raise DataError(f"{where}: reading videos needs PyAV: pip install 'mmalign[video]'") from err
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{where}: {path} has no video stream")
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            else:
                duration = (stream.frames or 0) / float(stream.average_rate or 1)
    except DataError:
        raise
    except Exception as err:  # PyAV raises its own error classes per codec/container problem
        raise DataError(f"{where}: cannot read video {path}: {err}") from err
    if not duration or duration <= 0:
        raise DataError(f"{where}: {path} has no usable duration")
    try:
        decode_frames(path)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    return duration


def uniform_segments(duration: float, segment_seconds: float) -> list[list[float]]:
    """``[[start, end], ...]`` segments of ``segment_seconds``, counted as ``data.segments.num_segments`` does."""
    from mmalign.data.segments import num_segments

    count = num_segments(duration, segment_seconds)
    bounds = [round(i * segment_seconds, 6) for i in range(count)] + [round(duration, 6)]
    return [[bounds[i], bounds[i + 1]] for i in range(count)]


def _float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _score_key(rows: list[dict], prefixes: tuple[str, ...], score_key: str | None) -> str | None:
    """The reward column to read (``score_key`` or the only numeric column all rows share)."""
    if score_key is not None:
        return score_key
    if prefixes == ("",):
        candidates = {
            k
            for k, v in rows[0].items()
            if k not in _NOT_SCORES and _float_or_none(v) is not None and not isinstance(v, bool)
        }
        for row in rows[1:]:
            candidates &= {k for k, v in row.items() if _float_or_none(v) is not None}
        return candidates.pop() if len(candidates) == 1 else None
    names = set()
    for k in rows[0]:
        for p in prefixes:
            if k.startswith(p + ".") and _float_or_none(rows[0][k]) is not None:
                names.add(k[len(p) + 1 :])
    if len(names) == 1:
        return names.pop()
    if all(f"score_{i}" in rows[0] for i in (0, 1)):
        return "score"
    return None


def _pair_scores(row: dict, cols: tuple[str, str], key: str | None) -> tuple[float, float] | None:
    if key is None:
        margin = _float_or_none(row.get("margin"))
        # `mmalign label` writes chosen/rejected with the reward's margin: chosen scored `margin` higher
        return (margin, 0.0) if margin is not None and cols == ("chosen", "rejected") else None
    values = (row.get(f"{cols[0]}.{key}"), row.get(f"{cols[1]}.{key}"))
    if key == "score" and values == (None, None):
        values = (row.get("score_0"), row.get("score_1"))
    a, b = (_float_or_none(v) for v in values)
    return (a, b) if a is not None and b is not None else None


def _item_id(prompt: str, a: str, b: str, taken: set[str]) -> str:
    base = hashlib.sha1(json.dumps([prompt, a, b]).encode()).hexdigest()[:12]
    out, n = base, 1
    while out in taken:
        out, n = f"{base}-{n}", n + 1
    taken.add(out)
    return out


def _video_segments(
    row: dict, where: str, duration: float, default_seconds: float
) -> tuple[list, float | None]:
    segs = row.get("segments")
    if isinstance(segs, str) and segs.strip():
        try:
            segs = json.loads(segs)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where}: segments={row['segments']!r} is not a JSON list of [start, end]"
            ) from err
    if segs:
        ok = isinstance(segs, list) and all(
            isinstance(s, list)
            and len(s) == 2
            and all(isinstance(x, (int, float)) for x in s)
            and s[0] < s[1]
            for s in segs
        )
        if not ok:
            raise DataError(f"{where}: segments must be a list of [start, end] seconds with start < end")
        return [[float(s), float(e)] for s, e in segs], None
    seconds = _float_or_none(row.get("segment_seconds")) or default_seconds
    if seconds <= 0:
        raise DataError(f"{where}: segment_seconds must be > 0")
    return uniform_segments(duration, seconds), seconds


def load_items(
    manifest: str | Path,
    *,
    seed: int = 0,
    segment_seconds: float = 1.0,
    pairs_per_group: int = 0,
    score_key: str | None = None,
    check_files: bool = True,
) -> list[Item]:
    """Read a pair manifest or a media manifest into items (see the module docstring).

    Args:
        manifest: JSONL/CSV path.
        seed: seeds the pairs drawn from a media manifest.
        segment_seconds: video segment length when a row gives neither ``segments`` nor ``segment_seconds``
            (DenseDPO uses 1 s).
        pairs_per_group: pairs drawn per group of a media manifest; 0 = ``n // 2`` disjoint pairs, so each
            candidate is shown once; -1 = every pair.
        score_key: the reward column whose scores are kept for ``annotate stats`` (default: the only numeric
            column, when there is exactly one).
        check_files: open every file (missing or undecodable media raise :class:`DataError` naming the row).

    Raises:
        DataError: naming the manifest row of the first bad input.
    """
    path = Path(manifest)
    base = path.parent
    rows = read_rows(path)
    first = rows[0][1]
    pair_cols = next((cols for cols in PAIR_KEYS if cols[0] in first or cols[1] in first), None)
    taken: set[str] = set()
    durations: dict[str, float] = {}

    def resolve(row: dict, key: str, where: str) -> Path:
        value = row.get(key)
        if value in (None, ""):
            raise DataError(f"{where}: missing column '{key}'")
        p = Path(str(value))
        return (p if p.is_absolute() else base / p).resolve()

    def check(p: Path, kind: str, where: str) -> None:
        if not check_files:
            return
        if kind == "image":
            check_image(p, where)
        elif str(p) not in durations:
            durations[str(p)] = video_duration(p, where)

    def make(
        prompt: str,
        a: Path,
        b: Path,
        kind: str,
        where: str,
        cols: tuple[str, str],
        row: dict,
        scores: tuple[float, float] | None,
    ) -> Item:
        item = Item(
            _item_id(prompt, str(a), str(b), taken),
            prompt,
            (str(a), str(b)),
            kind,
            where,
            cols,
            scores=scores,
        )
        if kind == "video":
            if check_files:
                item.duration = min(durations[str(a)], durations[str(b)])
            else:
                item.duration = _float_or_none(row.get("duration")) or segment_seconds
            item.segments, item.segment_seconds = _video_segments(row, where, item.duration, segment_seconds)
        return item

    items: list[Item] = []
    if pair_cols is not None:
        key = _score_key([r for _, r in rows], pair_cols, score_key)
        for where, row in rows:
            cols = next((c for c in PAIR_KEYS if c[0] in row or c[1] in row), None)
            if cols is None:
                raise DataError(
                    f"{where}: expected media columns chosen/rejected, image_0/image_1 or "
                    f"video_0/video_1; got {sorted(row)}"
                )
            prompt = row.get("prompt", row.get("caption"))
            if prompt in (None, ""):
                raise DataError(f"{where}: missing column 'prompt'")
            a, b = resolve(row, cols[0], where), resolve(row, cols[1], where)
            kind = "video" if cols[0] == "video_0" else _kind_of(a, row)
            check(a, kind, f"{where} ({cols[0]})")
            check(b, kind, f"{where} ({cols[1]})")
            items.append(make(str(prompt), a, b, kind, where, cols, row, _pair_scores(row, cols, key)))
        return items

    media_key = next((k for k in MEDIA_KEYS if k in first), None)
    if media_key is None:
        raise DataError(
            f"{rows[0][0]}: expected a pair manifest (chosen/rejected, image_0/image_1, video_0/video_1) "
            f"or a media manifest with a 'path' column; got {sorted(first)}"
        )
    key = _score_key([r for _, r in rows], ("",), score_key)
    groups: dict[str, list[tuple[str, dict, Path, str]]] = {}
    for where, row in rows:
        prompt = row.get("prompt", row.get("caption"))
        if prompt in (None, ""):
            raise DataError(f"{where}: missing column 'prompt'")
        p = resolve(row, media_key, where)
        kind = _kind_of(p, row)
        check(p, kind, where)
        groups.setdefault(str(row.get("group") or prompt), []).append((where, row, p, kind))
    rng = random.Random(seed)
    for members in groups.values():
        if len(members) < 2:
            continue
        if pairs_per_group == -1:
            pairs = list(itertools.combinations(range(len(members)), 2))
            rng.shuffle(pairs)
        else:
            order = list(range(len(members)))
            rng.shuffle(order)
            pairs = [(order[i], order[i + 1]) for i in range(0, len(order) - 1, 2)]
            if pairs_per_group > len(pairs):
                extra = [
                    p
                    for p in itertools.combinations(range(len(members)), 2)
                    if p not in pairs and p[::-1] not in pairs
                ]
                rng.shuffle(extra)
                pairs += extra
            if pairs_per_group > 0:
                pairs = pairs[:pairs_per_group]
        for i, j in pairs:
            (wa, ra, pa, ka), (wb, rb, pb, kb) = members[i], members[j]
            if ka != kb:
                raise DataError(f"{wa} and {wb}: one group mixes an image and a video")
            where = f"{wa}+{wb.rsplit(':', 1)[-1]}"
            scores = None
            if key is not None:
                sa, sb = _float_or_none(ra.get(key)), _float_or_none(rb.get(key))
                scores = (sa, sb) if sa is not None and sb is not None else None
            items.append(
                make(
                    str(ra.get("prompt", ra.get("caption"))),
                    pa,
                    pb,
                    ka,
                    where,
                    ("image_0", "image_1") if ka == "image" else ("video_0", "video_1"),
                    ra,
                    scores,
                )
            )
    if not items:
        raise DataError(f"{path}: no group has two candidates to compare (group rows by 'group' or 'prompt')")
    return items
