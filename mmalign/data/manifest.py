"""The media manifest: one JSON object per generated file, written by ``mmalign generate`` beside its media.

Format (``manifest.jsonl``; extra keys are kept)::

    {"path": "00000.png", "prompt": "...", "negative_prompt": "", "seed": 0, "guidance": 5.0, "steps": 25,
     "model": "<hub id or dir>", "lora": null, "kind": "image" | "video", "group": "<prompt group id>"}

``path`` is relative to the manifest's folder; ``group`` identifies the candidates of one prompt (default: the
prompt). ``score``, ``label``, ``eval`` and the annotation tools read it through :func:`read_manifest`.

Prompt files (``generate --prompts FILE``, ``eval --prompts FILE``) are read by :func:`read_prompts`: a ``.txt``
file (one prompt per line), a JSONL file or a CSV with a ``prompt`` (or ``caption``) column and optional
``negative_prompt`` and ``group``. A media manifest is a valid prompt file too.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmalign.data.images import DataError
from mmalign.data.index_file import write_atomic
from mmalign.utils import TEXT_ENCODING, read_jsonl_lenient

MANIFEST_NAME = "manifest.jsonl"
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
VIDEO_EXTS = {".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif"}
_FIELDS = ("path", "prompt", "negative_prompt", "seed", "guidance", "steps", "model", "lora", "kind", "group")


def media_kind(path: str | Path) -> str:
    """``image`` or ``video`` from the file extension."""
    return "video" if Path(path).suffix.lower() in VIDEO_EXTS else "image"


@dataclass
class MediaRecord:
    """One generated file.

    Attributes:
        path: Media path, relative to the manifest's folder when written (absolute after :func:`read_manifest`).
        prompt: The prompt it was generated from.
        negative_prompt: Negative prompt ("" when none).
        seed: Sampling seed.
        guidance: CFG scale.
        steps: Sampler steps.
        model: Hub id or directory of the pipeline.
        lora: LoRA directory loaded into it (a list for several), or None.
        kind: ``image`` or ``video``.
        group: Candidates of one prompt share it (default: the prompt).
        extra: Any other keys, kept.
    """

    path: str
    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    guidance: float | None = None
    steps: int | None = None
    model: str | None = None
    lora: str | list[str] | None = None
    kind: str = "image"
    group: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.group:
            self.group = self.prompt

    def to_row(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k != "extra"}
        row.update(self.extra)
        return row


@dataclass
class PromptSpec:
    """A prompt to generate from: text, optional negative prompt and group id."""

    prompt: str
    negative_prompt: str = ""
    group: str = ""


def read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) for every row of a JSONL or CSV file; bad JSON names its line."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding=TEXT_ENCODING) as fh:
            return [(f"{path}:{i}", dict(row)) for i, row in enumerate(csv.DictReader(fh), start=2)]
    rows = []
    with path.open(encoding=TEXT_ENCODING) as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{i}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path}:{i}", row))
    return rows


def read_prompts(path: str | Path) -> list[PromptSpec]:
    """Prompts from a ``.txt`` (one per line), ``.jsonl`` or ``.csv`` file (see module docstring).

    Raises:
        DataError: naming the file and row when it is missing, empty or a row has no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found")
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        specs = [
            PromptSpec(line.strip())
            for line in path.read_text(encoding=TEXT_ENCODING).splitlines()
            if line.strip()
        ]
    else:
        specs, seen = [], set()
        for where, row in read_rows(path):
            prompt = row.get("prompt", row.get("caption"))
            if all(str(v or "").strip() == "" for v in row.values()):
                continue  # an empty row, as a blank line of a .txt prompt file
            if prompt is None:
                raise DataError(f"{where}: no 'prompt' (or 'caption'); keys are {sorted(row)}")
            if str(prompt).strip() == "":
                raise DataError(
                    f"{where}: empty prompt (the row has {', '.join(f'{k}={v!r}' for k, v in row.items() if v)})"
                )
            spec = PromptSpec(str(prompt), str(row.get("negative_prompt") or ""), str(row.get("group") or ""))
            key = (spec.prompt, spec.negative_prompt, spec.group)
            if "path" in row and key in seen:  # a media manifest lists each prompt once per candidate
                continue
            seen.add(key)
            specs.append(spec)
    if not specs:
        raise DataError(f"{path}: no prompts")
    return specs


def find_manifest(source: str | Path) -> Path | None:
    """``source`` itself if it is a ``.jsonl`` file, ``source/manifest.jsonl`` for a folder, else None."""
    source = Path(source)
    if source.is_dir():
        candidate = source / MANIFEST_NAME
        return candidate if candidate.is_file() else None
    return source if source.is_file() and source.suffix.lower() == ".jsonl" else None


def is_media_manifest(path: str | Path) -> bool:
    """True when the first row has ``path`` and ``prompt`` (a pair manifest has chosen/rejected instead)."""
    rows = read_rows(Path(path))
    return bool(rows) and "path" in rows[0][1] and "prompt" in rows[0][1]


def read_manifest(path: str | Path) -> list[MediaRecord]:
    """Records of a media manifest (a ``.jsonl`` file or a folder holding ``manifest.jsonl``), paths made absolute.

    Raises:
        DataError: naming the row when ``path`` or ``prompt`` is missing, or the file does not exist.
    """
    source = Path(path)
    found = find_manifest(source)
    if found is None:
        raise DataError(f"{source}: no media manifest ({MANIFEST_NAME}); `mmalign generate` writes one")
    base = found.parent
    records = []
    for where, row in read_rows(found):
        if not row.get("path"):
            raise DataError(f"{where}: missing 'path'")
        if "prompt" not in row or row["prompt"] is None:
            raise DataError(f"{where}: missing 'prompt'")
        p = Path(str(row["path"]))
        p = p if p.is_absolute() else base / p
        extra = {k: v for k, v in row.items() if k not in _FIELDS}
        known = {k: row[k] for k in _FIELDS if k in row and k != "path"}
        known.setdefault("kind", media_kind(p))
        known["group"] = str(known.get("group") or "")
        known["negative_prompt"] = str(known.get("negative_prompt") or "")
        records.append(MediaRecord(path=str(p), extra=extra, **known))
    if not records:
        raise DataError(f"{found}: the manifest is empty")
    return records


def _manifest_lines(records: Iterable[MediaRecord], base: Path) -> list[str]:
    lines = []
    for rec in records:
        row = rec.to_row()
        p = Path(rec.path)
        row["path"] = Path(os.path.relpath(p.resolve(), base)).as_posix() if p.is_absolute() else p.as_posix()
        lines.append(json.dumps(row) + "\n")
    return lines


def manifest_row(record: MediaRecord, path: str | Path) -> dict[str, Any]:
    """The JSON object :func:`write_manifest` writes for ``record`` into the manifest at ``path``."""
    return json.loads(_manifest_lines([record], Path(path).parent.resolve())[0])


def write_manifest(records: Iterable[MediaRecord], path: str | Path) -> Path:
    """Write records as JSONL with paths relative to ``path``'s folder, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = _manifest_lines(records, path.parent.resolve())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.writelines(lines)
    os.replace(tmp, path)
    return path


class ResumableRows:
    """A JSONL file that a long command fills row by row, so a rerun after an interruption redoes only the rest.

    Finished rows are appended to ``<path>.partial`` as they come; :meth:`finish` writes ``<path>`` atomically and
    removes the partial, so ``<path>`` exists only once the whole job is done and no reader takes a half-done
    folder for a finished one. ``previous`` holds an earlier run's rows (its finished file, then its partial; a
    torn last line is skipped) for the command to decide which it can keep.

    Example::

        rows = ResumableRows(out / "pairs.jsonl")
        kept = [r for r in rows.previous if made_the_same_way(r)]
        rows.start(kept)
        for job in jobs_not_in(kept):
            rows.append([do(job)])
        rows.finish(kept + new_rows)
    """

    def __init__(self, path: str | Path, *, resume: bool = True) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(f"{self.path.name}.partial")
        self.previous = read_jsonl_lenient(self.path) + read_jsonl_lenient(self.partial) if resume else []

    def start(self, kept: Iterable[dict[str, Any]] = ()) -> None:
        """Begin with ``kept`` rows of the previous run; ``path`` is removed until :meth:`finish`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.partial, _jsonl(kept))
        self.path.unlink(missing_ok=True)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Record finished rows (flushed to the OS; a crash can tear at most the last line)."""
        with self.partial.open("a") as fh:
            fh.write(_jsonl(rows))
            fh.flush()

    def finish(self, rows: Iterable[dict[str, Any]]) -> Path:
        """Write the complete file atomically (in the order given) and drop the partial one."""
        write_atomic(self.path, _jsonl(rows))
        self.partial.unlink(missing_ok=True)
        return self.path


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)
