"""The labels file and who labels what next.

The labels file is append-only JSONL, the only state the server keeps on disk. Two record types::

    {"type": "label", "label_id": "…", "annotator": "ann1", "item": "3f2a…", "choice": "a" | "b" | "tie" | "skip",
     "left": "a" | "b", "segment_labels": [1, 0, -1] | null, "elapsed_ms": 5123, "time": 1764250000.1, <item fields>}
    {"type": "undo", "label_id": "…", "annotator": "ann1", "time": …}

``choice`` and ``segment_labels`` are relative to the item's media ``a`` (+1 = a better), whatever side ``a`` was
shown on (``left``). Each record is written with one ``write``, flushed and ``fsync``-ed before the server
answers, so an acknowledged label survives any crash. A server killed mid-write leaves at most one torn
last line without its newline; it was never acknowledged, and :func:`read_labels` cuts it off. A label id
is chosen by the page, so a retried POST finds its id already recorded and changes nothing.

Assignment: an item goes to ``overlap`` different annotators (skips do not count towards it, but the person
who skipped never sees the item again). An item shown to someone is leased to them for ``lease_seconds``
so concurrent annotators are not all given the same last item; leases live in memory only (after a restart
the page asks again).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmalign.annotate.items import Item
from mmalign.data.images import DataError

CHOICES = ("a", "b", "tie", "skip")


class Conflict(Exception):
    """The request is well-formed but cannot be applied (HTTP 409); nothing was written."""


def read_labels(path: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Every record of a labels file, in order.

    A last line without its newline is a write the server never acknowledged (it was killed mid-write):
    it is dropped, and with ``repair`` cut off the file. Any other line that is not a JSON object raises
    :class:`DataError` naming it.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with path.open("r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
    records = []
    for i, line in enumerate(data[:end].decode("utf-8", errors="replace").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{i}: not valid JSON ({err}); the labels file was edited or corrupted"
            ) from err
        if not isinstance(rec, dict) or rec.get("type") not in ("label", "undo") or "label_id" not in rec:
            raise DataError(f"{path}:{i}: not a label or undo record")
        records.append(rec)
    return records


def active_labels(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The labels that stand: first record of each id, minus the undone ones, in file order."""
    labels: dict[str, dict[str, Any]] = {}
    undone: set[str] = set()
    for rec in records:
        if rec["type"] == "label":
            labels.setdefault(rec["label_id"], rec)
        else:
            undone.add(rec["label_id"])
    return [rec for lid, rec in labels.items() if lid not in undone]


class LabelStore:
    """Labels on disk plus the assignment state derived from them.

    Args:
        path: the labels JSONL (created if missing; an existing one is replayed).
        items: what to label.
        overlap: how many different annotators label each item.
        seed: seeds which side each annotator sees media ``a`` on.
        lease_seconds: how long an item shown to someone stays reserved for them.
    """

    def __init__(
        self,
        path: str | Path,
        items: list[Item],
        *,
        overlap: int = 1,
        seed: int = 0,
        lease_seconds: float = 600.0,
    ):
        if overlap < 1:
            raise ValueError(f"overlap={overlap} must be >= 1")
        self.path = Path(path)
        self.items = items
        self.by_id = {it.id: it for it in items}
        self.index = {it.id: i for i, it in enumerate(items)}
        self.overlap, self.seed, self.lease_seconds = overlap, seed, lease_seconds
        self.lock = threading.RLock()
        self.labels: dict[str, dict[str, Any]] = {}  # label id -> record (undone ones too)
        self.undone: set[str] = set()
        self.seen: dict[str, dict[str, str]] = {}  # item -> annotator -> active label id
        self.counts: dict[str, int] = {}  # item -> active non-skip labels
        self.by_annotator: dict[str, set[str]] = {}  # annotator -> items with their active label
        self.complete = 0  # items with ``overlap`` labels
        self.cursor = 0  # every item before this index is complete
        self.leases: dict[str, dict[str, float]] = {}  # item -> annotator -> expiry
        self.current: dict[str, str] = {}  # annotator -> leased item
        self.unknown_items = 0
        self.torn = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            size = self.path.stat().st_size
            for rec in read_labels(self.path, repair=True):
                self._apply(rec)
            self.torn = size - self.path.stat().st_size
        new = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if new:  # make the file's directory entry durable too
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # ---------------------------------------------------------------------------------------------
    # state

    def _apply(self, rec: dict[str, Any]) -> None:
        lid = rec["label_id"]
        if rec["type"] == "label":
            if lid in self.labels:
                return
            self.labels[lid] = rec
            item, who = rec.get("item"), rec.get("annotator")
            if item not in self.by_id:
                self.unknown_items += 1
                return
            self.seen.setdefault(item, {})[who] = lid
            self.by_annotator.setdefault(who, set()).add(item)
            if rec.get("choice") != "skip":
                self._count(item, +1)
        elif lid in self.labels and lid not in self.undone:
            self.undone.add(lid)
            rec = self.labels[lid]
            item, who = rec.get("item"), rec.get("annotator")
            if item in self.seen and self.seen[item].get(who) == lid:
                del self.seen[item][who]
                self.by_annotator[who].discard(item)
                if rec.get("choice") != "skip":
                    self._count(item, -1)

    def _count(self, item: str, delta: int) -> None:
        before = self.counts.get(item, 0)
        self.counts[item] = before + delta
        if before < self.overlap <= before + delta:
            self.complete += 1
        elif before + delta < self.overlap <= before:
            self.complete -= 1
            self.cursor = min(self.cursor, self.index[item])

    def _append(self, rec: dict[str, Any]) -> None:
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        size = os.fstat(self._fd).st_size
        try:
            if os.write(self._fd, line) != len(line):
                raise OSError(f"short write to {self.path} (disk full?)")
            os.fsync(self._fd)
        except OSError:
            os.ftruncate(self._fd, size)  # never leave half a line for the next record to follow
            raise
        self._apply(rec)

    def close(self) -> None:
        os.close(self._fd)

    def flipped(self, annotator: str, item_id: str) -> bool:
        """Whether ``annotator`` sees media ``b`` on the left for this item (seeded, stable across reloads)."""
        digest = hashlib.sha1(f"{self.seed}\0{annotator}\0{item_id}".encode()).digest()
        return bool(digest[0] & 1)

    def _live_leases(self, item_id: str, now: float) -> dict[str, float]:
        leases = self.leases.get(item_id, {})
        for who in [w for w, t in leases.items() if t <= now]:
            del leases[who]
            if self.current.get(who) == item_id:
                del self.current[who]
        return leases

    def _open_for(self, item_id: str, annotator: str, now: float) -> bool:
        if annotator in self.seen.get(item_id, {}):
            return False
        others = sum(1 for w in self._live_leases(item_id, now) if w != annotator)
        return self.counts.get(item_id, 0) + others < self.overlap

    def _lease(self, item_id: str, annotator: str, now: float) -> None:
        old = self.current.get(annotator)
        if old is not None and old != item_id:
            self.leases.get(old, {}).pop(annotator, None)
        self.leases.setdefault(item_id, {})[annotator] = now + self.lease_seconds
        self.current[annotator] = item_id

    # ---------------------------------------------------------------------------------------------
    # requests

    def next_item(self, annotator: str, *, now: float | None = None) -> Item | None:
        """The item ``annotator`` should label now (their leased one if still open), or ``None`` when done."""
        now = time.time() if now is None else now
        with self.lock:
            held = self.current.get(annotator)
            if (
                held is not None
                and self.leases.get(held, {}).get(annotator, 0) > now
                and self._open_for(held, annotator, now)
            ):
                self._lease(held, annotator, now)
                return self.by_id[held]
            while (
                self.cursor < len(self.items)
                and self.counts.get(self.items[self.cursor].id, 0) >= self.overlap
            ):
                self.cursor += 1
            for item in self.items[self.cursor :]:
                if self._open_for(item.id, annotator, now):
                    self._lease(item.id, annotator, now)
                    return item
            self.current.pop(annotator, None)
            return None

    def submit(
        self,
        *,
        label_id: str,
        annotator: str,
        item_id: str,
        choice: str,
        segments: list[str] | None,
        elapsed_ms: int,
        now: float | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Record a label given in screen terms (``choice`` left/right/tie/skip, ``segments`` left/right/tie).

        Returns:
            (the stored record, whether it was new). A label id already recorded returns the stored record
            unchanged (a retried POST).

        Raises:
            KeyError: unknown item. ValueError: a choice/segments that do not fit the item.
            Conflict: the annotator already labelled the item, or it already has ``overlap`` labels.
        """
        now = time.time() if now is None else now
        with self.lock:
            if label_id in self.labels:
                old = self.labels[label_id]
                if old.get("annotator") != annotator or old.get("item") != item_id:
                    raise Conflict(f"label id {label_id} is already used for another label")
                return old, False
            item = self.by_id.get(item_id)
            if item is None:
                raise KeyError(item_id)
            if annotator in self.seen.get(item_id, {}):
                raise Conflict(f"{annotator} already labelled item {item_id}")
            if choice != "skip" and self.counts.get(item_id, 0) >= self.overlap:
                raise Conflict(f"item {item_id} already has {self.overlap} label(s)")
            left = "b" if self.flipped(annotator, item_id) else "a"
            right = "a" if left == "b" else "b"
            to_ab = {"left": left, "right": right, "tie": "tie"}
            canon = to_ab.get(choice, choice)
            seg_labels = None
            if item.kind == "video" and choice != "skip":
                if segments is None or len(segments) != len(item.segments or []):
                    raise ValueError(
                        f"item {item_id} has {len(item.segments or [])} segments; "
                        f"got {0 if segments is None else len(segments)} segment labels"
                    )
                seg_labels = [{"a": 1, "b": -1, "tie": 0}[to_ab[s]] for s in segments]
            elif segments:
                raise ValueError("segment labels are only for video items (and not with skip)")
            rec = {
                "type": "label",
                "label_id": label_id,
                "annotator": annotator,
                "choice": canon,
                "left": left,
                "segment_labels": seg_labels,
                "elapsed_ms": int(elapsed_ms),
                "time": round(now, 3),
                **item.record(),
            }
            self._append(rec)
            leases = self.leases.get(item_id, {})
            leases.pop(annotator, None)
            if self.current.get(annotator) == item_id:
                del self.current[annotator]
            return rec, True

    def undo(self, *, annotator: str, label_id: str, now: float | None = None) -> Item:
        """Withdraw ``annotator``'s label ``label_id``; the item is leased back to them to label again.

        Undoing an already undone label changes nothing (a retried POST)."""
        now = time.time() if now is None else now
        with self.lock:
            rec = self.labels.get(label_id)
            if rec is None or rec.get("annotator") != annotator:
                raise KeyError(label_id)
            item_id = rec["item"]
            if item_id not in self.by_id:
                raise KeyError(label_id)
            if label_id not in self.undone:
                self._append(
                    {"type": "undo", "label_id": label_id, "annotator": annotator, "time": round(now, 3)}
                )
            if annotator not in self.seen.get(item_id, {}):
                self._lease(item_id, annotator, now)
            return self.by_id[item_id]

    def progress(self, annotator: str) -> dict[str, int]:
        with self.lock:
            mine = self.by_annotator.get(annotator, set())
            open_mine = sum(1 for item in mine if self.counts.get(item, 0) < self.overlap)
            return {
                "mine": len(mine),
                "left_for_me": len(self.items) - self.complete - open_mine,
                "complete": self.complete,
                "total": len(self.items),
                "overlap": self.overlap,
            }
