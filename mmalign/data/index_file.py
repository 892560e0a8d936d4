"""A JSON index that several processes (concurrent runs sharing one cache) update without losing entries.

Each update takes an exclusive ``fcntl`` lock on ``<index>.lock``, re-reads the index from disk, merges this
process's entries into it, writes it to a per-process temporary file and renames that over the index. Readers
need no lock: the rename is atomic, so they see the old or the new index, never half of one. Shard files are
named uniquely per writer (:func:`unique_name`), so two writers never produce the same shard.

On platforms without ``fcntl`` (Windows) the merge still happens but is not locked.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path.lock`` (created if needed) for the ``with`` block."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_index(path: Path, empty: Callable[[], Any]) -> Any:
    """The index at ``path``, or ``empty()`` when there is none yet."""
    return json.loads(path.read_text()) if path.exists() else empty()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a per-process temporary file beside ``path`` and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def merge_update(path: Path, mine: Any, merge: Callable[[Any, Any], Any], empty: Callable[[], Any]) -> Any:
    """Under the lock: read the index on disk, ``merge(on_disk, mine)``, write the result; return it."""
    with locked(path):
        merged = merge(read_index(path, empty), mine)
        write_atomic(path, json.dumps(merged))
    return merged


def unique_name(prefix: str, suffix: str = ".safetensors") -> str:
    """A shard name no other writer will pick: ``<prefix>-<pid>-<random>.safetensors``."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:12]}{suffix}"
