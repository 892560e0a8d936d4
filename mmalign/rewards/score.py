"""``mmalign score``: score a folder, a manifest or a pair dataset with one or more rewards -> JSONL/CSV.

Sources:

- a folder holding ``manifest.jsonl`` (what ``mmalign generate`` writes): the media it lists, with their prompts
  and prompt groups.
- any other folder: every image (png/jpg/jpeg/webp/bmp), GIF or video (mp4/webm/mov/avi/mkv, needs
  ``mmalign[video]``) below it; the prompt is read from ``<stem>.txt`` beside the file, else ``prompt.txt`` in its
  folder, else "" (``mmalign score`` refuses empty prompts unless ``--allow-empty-prompt``).
- a manifest (``.jsonl`` / ``.csv``): a media column (``path``, ``media``, ``image``, ``video`` or ``file``) and
  ``prompt`` (or ``caption``); paths relative to the manifest.
- a pair dataset: a manifest with ``chosen`` and ``rejected`` columns (what ``mmalign label`` writes); both
  sides are scored into ``chosen.<reward>`` / ``rejected.<reward>`` plus ``<reward>.agrees`` (reward prefers
  the chosen side).

One output row per item with every reward (and every hybrid/ensemble component as ``<reward>.<component>``).
Hybrid/ensemble rewards are normalised over the whole scored set or per prompt group, never per batch: each
batch stores the members' raw scores, and the totals are computed once from all rows at the end (see
``mmalign/rewards/combine.py``), so the batch size never changes a score.
Media paths in the output are relative to the output file. Re-running skips rows already scored with the same
rewards and settings (resumable: finished batches are appended to ``<out>.partial`` and merged at the end); the
settings each reward column was scored with (reward arguments such as ``--user``, the contents of files they
name, video sampling) are kept in ``<out>.settings.json``, and a column scored otherwise is scored again. The
output file is replaced atomically. An unreadable file yields a row with ``error`` set, not a crash.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign.rewards import Reward, RewardSpec
from mmalign.utils import TEXT_ENCODING, read_jsonl_lenient

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
VIDEO_EXTS = {".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif"}
MEDIA_KEYS = ("path", "media", "image", "video", "file")


@dataclass
class Item:
    """One row to score.

    Attributes:
        id: Stable key for resuming (path relative to the source, or the manifest's ``id``).
        prompt: Text prompt.
        paths: Side -> media path (``{"media": p}``, or ``{"chosen": p, "rejected": p}`` for pairs).
        extra: Other manifest columns, copied to the output.
    """

    id: str
    prompt: str
    paths: dict[str, Path]
    extra: dict[str, Any] = field(default_factory=dict)


def load_media(path: str | Path) -> tuple[torch.Tensor, float | None]:
    """Decode an image or a video into float pixels in [0, 1].

    Returns:
        ([3,H,W] image or [T,3,H,W] video, fps or None).

    Raises:
        ValueError: naming the file, when it is missing or cannot be decoded.
    """
    media, fps = load_media_uint8(path)
    return media.float() / 255.0, fps


def load_media_uint8(path: str | Path) -> tuple[torch.Tensor, float | None]:
    """``load_media`` without the conversion: uint8 pixels (``score_items`` converts on the reward's device)."""
    from mmalign.limits import check_media_file, decode_deadline

    path = Path(path)
    check_media_file(path)  # MediaError (a ValueError) for a missing, irregular, empty or oversized file
    with decode_deadline(str(path)):  # MediaError when one file takes longer than MMALIGN_DECODE_TIMEOUT
        return _decode_media(path)


def _decode_media(path: Path) -> tuple[torch.Tensor, float | None]:
    import numpy as np
    from PIL import ImageSequence

    from mmalign.limits import MAX_VIDEO_PIXELS, check_pixels, open_image

    ext = path.suffix.lower()
    try:
        if ext == ".gif":
            with open_image(path) as im:  # declared size x frames checked before decoding
                frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
                duration_ms = im.info.get("duration") or 0
            arr = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
            return arr, (1000.0 / duration_ms if duration_ms else None)
        if ext in VIDEO_EXTS:
            try:
                import av
            except ImportError as e:
                raise ValueError(f"{path}: decoding video needs PyAV: pip install 'mmalign[video]'") from e
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                fps = float(stream.average_rate) if stream.average_rate else None
                frames, pixels = [], 0
                for f in container.decode(
                    stream
                ):  # stop at the pixel limit, not at the end of an endless stream
                    pixels += f.width * f.height
                    if pixels > MAX_VIDEO_PIXELS:
                        check_pixels(f.width, f.height, str(path), frames=len(frames) + 1)
                    frames.append(f.to_ndarray(format="rgb24"))
            if not frames:
                raise ValueError(f"{path}: no video frames")
            return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2), fps
        with open_image(path) as im:
            arr = np.asarray(im.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), None
    except ValueError:
        raise
    except Exception as e:  # decoders raise many types on corrupt data (OSError, SyntaxError, EOFError, ...)
        raise ValueError(f"{path}: cannot decode ({type(e).__name__}: {str(e)[:200]})") from None


def _prompt_for(path: Path) -> str:
    for candidate in (path.with_suffix(".txt"), path.parent / "prompt.txt"):
        if candidate.is_file():  # a regular file (not a FIFO or device); the first 64 KB at most
            with candidate.open("rb") as fh:
                return fh.read(1 << 16).decode("utf-8", errors="replace").strip()
    return ""


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL or CSV file; a line that does not parse is an error naming it, the last one included (the
    files commands append to as they go are ``.partial`` files, read with ``read_jsonl_lenient``)."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding=TEXT_ENCODING) as f:
            return list(csv.DictReader(f))
    rows = []
    lines = path.read_text(encoding=TEXT_ENCODING).splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from None
    return rows


def collect_items(source: str | Path) -> list[Item]:
    """Items of a folder, a media manifest or a pair manifest (see module docstring)."""
    source = Path(source)
    if source.is_dir() and (source / "manifest.jsonl").is_file():
        return collect_items(source / "manifest.jsonl")
    if source.is_dir() and (source / "manifest.jsonl.partial").is_file():
        raise ValueError(
            f"{source}: `mmalign generate` has not finished writing this folder (manifest.jsonl.partial, no "
            "manifest.jsonl); run the same generate command again to complete it"
        )
    if source.is_dir():
        files = sorted(
            p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS and p.is_file()
        )
        return [Item(p.relative_to(source).as_posix(), _prompt_for(p), {"media": p}) for p in files]
    if not source.is_file():
        raise ValueError(f"{source}: no such folder or manifest")
    if source.suffix.lower() not in (".jsonl", ".csv"):
        raise ValueError(f"{source}: a manifest must be .jsonl or .csv (or pass a folder)")
    items = []
    for i, row in enumerate(read_table(source)):
        if not isinstance(row, dict):
            raise ValueError(
                f"{source} row {i + 1}: expected an object with media and prompt columns, got {type(row).__name__}"
            )
        prompt = str(row.get("prompt", row.get("caption", "")) or "")
        if "chosen" in row and "rejected" in row:
            paths = {
                "chosen": source.parent / str(row["chosen"]),
                "rejected": source.parent / str(row["rejected"]),
            }
            key = str(row.get("id", f"{row['chosen']}|{row['rejected']}"))
            skip = {"chosen", "rejected", "prompt", "caption", "id"}
        else:
            media_key = next((k for k in MEDIA_KEYS if row.get(k)), None)
            if media_key is None:
                raise ValueError(
                    f"{source} row {i + 1}: no media column (one of {MEDIA_KEYS}, or chosen/rejected)"
                )
            paths = {"media": source.parent / str(row[media_key])}
            key = str(row.get("id", row[media_key]))
            skip = {media_key, "prompt", "caption", "id"}
        items.append(Item(key, prompt, paths, {k: v for k, v in row.items() if k not in skip}))
    return items


def load_reward_config(
    path: str | Path, defaults: Callable[[str], dict[str, Any]] | None = None
) -> dict[str, Reward]:
    """Build named rewards from a YAML/JSON file: ``rewards: [{name, weight, kwargs}, ...]``.

    With ``combine: hybrid`` or ``combine: ensemble`` (plus ``normalizer``, ``aggregate``, ``lam``), the specs
    become the members of one combined reward named ``combine`` (spec weights are the hybrid weights).
    ``defaults(name)``: keyword arguments for the reward ``name`` where the file gives none (the command line's
    ``--device``/``--dtype``).
    """
    from mmalign.utils import safe_load

    data = safe_load(Path(path).read_text(encoding=TEXT_ENCODING)) or {}
    if isinstance(data, list):
        data = {"rewards": data}
    valid = {"rewards", "combine", "normalizer", "normalize_over", "aggregate", "lam", "name"}
    unknown = set(data) - valid
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; valid: {', '.join(sorted(valid))}")
    specs = [RewardSpec.from_dict(s) for s in data.get("rewards") or []]
    if defaults is not None:
        specs = [dataclasses.replace(s, kwargs={**defaults(s.name), **s.kwargs}) for s in specs]
    if not specs:
        raise ValueError(f"{path}: lists no rewards (expected `rewards: [{{name: ..., kwargs: {{...}}}}]`)")
    combine = data.get("combine")
    if combine is None:
        return build_named_rewards(specs)
    from mmalign.rewards import combine as comb

    members = [{"name": s.name, "weight": s.weight, "kwargs": s.kwargs} for s in specs]
    normalizer = data.get("normalizer", "zscore")
    over = data.get("normalize_over")
    if over is not None and over not in comb.NORMALIZE_OVER:
        raise ValueError(
            f"{path}: normalize_over={over!r}; use prompt (normalise within each prompt's candidates) or set"
        )
    if combine == "hybrid":
        reward: Reward = comb.hybrid(members, normalizer=normalizer, normalize_over=over)
    elif combine == "ensemble":
        reward = comb.ensemble(
            members,
            aggregate=data.get("aggregate", "mean"),
            lam=float(data.get("lam", 1.0)),
            normalizer=normalizer,
            normalize_over=over,
        )
    else:
        raise ValueError(f"{path}: combine={combine!r}; use hybrid or ensemble (or omit it)")
    return {str(data.get("name", combine)): reward}


def build_named_rewards(specs: Iterable[RewardSpec]) -> dict[str, Reward]:
    """Build each spec under its name (``name#2`` for repeats)."""
    out: dict[str, Reward] = {}
    for spec in specs:
        name = spec.name
        k = 2
        while name in out:
            name, k = f"{spec.name}#{k}", k + 1
        try:
            out[name] = spec.build()
        except TypeError as err:  # a keyword the factory does not take
            raise ValueError(f"reward {spec.name!r} with arguments {spec.kwargs}: {err}") from None
    return out


def is_combined(reward: Reward) -> bool:
    """A hybrid/ensemble: scored as per-batch ``raw`` member scores, combined over the whole set at the end."""
    return callable(getattr(reward, "raw", None)) and callable(getattr(reward, "combine", None))


def _call_reward(
    reward: Reward, media: torch.Tensor, prompts: list[str], fps: float | None
) -> dict[str, torch.Tensor]:
    """Columns of one reward on a batch: ``""`` (the score), or a hybrid/ensemble's raw member scores (``.<m>/raw``)."""
    takes_fps = fps is not None and getattr(reward, "accepts_fps", False)
    kwargs = {"fps": fps} if takes_fps else {}
    with torch.no_grad():
        if is_combined(reward):
            return {"." + k: v for k, v in reward.raw(media, prompts, **kwargs).items()}
        return {"": reward(media, prompts, **kwargs)}


class SetScores:
    """Score a set batch by batch, with the result one call on the whole set would give; holds scores, not media.

    A plain reward scores each item on its own, so each batch is scored as it comes. A hybrid/ensemble keeps its
    members' raw scores per batch and normalises them once over the whole set in :meth:`result` (within each
    prompt when its ``normalize_over`` is ``prompt``, over the set otherwise, as its ``__call__`` does).

    Example::

        scores = SetScores(rewards)
        for i, media in iter_samples(pipe, prompts, seeds, batch_size=8):
            scores.add(media, prompts[i : i + len(media)])
        totals = scores.result()  # reward name -> [N] (or [N,S] per-segment) scores
    """

    def __init__(self, rewards: Mapping[str, Reward]) -> None:
        if not rewards:
            raise ValueError("SetScores needs at least one reward")
        self.rewards = dict(rewards)
        self.prompts: list[str] = []
        self._columns: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in self.rewards}

    def add(self, media: torch.Tensor, prompts: Sequence[str], fps: float | None = None) -> None:
        """Score one batch: media [B,...] in [0, 1] with its B prompts."""
        if len(media) != len(prompts):
            raise ValueError(f"SetScores.add: {len(media)} media but {len(prompts)} prompts")
        for name, reward in self.rewards.items():
            columns = _call_reward(reward, media, list(prompts), fps)
            self._columns[name].append({k: v.detach().float().cpu() for k, v in columns.items()})
        self.prompts.extend(prompts)

    def result(self) -> dict[str, torch.Tensor]:
        """Reward name -> scores of every item added, in order: [N], or [N,S] for per-segment scores."""
        if not self.prompts:
            raise ValueError("SetScores.result: no media were added")
        out = {}
        for name, reward in self.rewards.items():
            batches = self._columns[name]
            columns = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
            if is_combined(reward):
                over_prompt = getattr(reward, "normalize_over", None) == "prompt"
                raw = {key.removeprefix("."): value for key, value in columns.items()}
                out[name] = reward.combine(raw, self.prompts if over_prompt else None)["total"]
            else:
                out[name] = columns[""]
        return out


def _jsonable(value: torch.Tensor) -> Any:
    if value.ndim == 0:
        x = float(value)
        return None if math.isnan(x) else x
    return [_jsonable(v) for v in value]


def score_batch(
    rewards: dict[str, Reward], media: list[torch.Tensor], prompts: list[str], fps: list[float | None]
) -> list[dict[str, Any]]:
    """Score loaded media, grouping items of equal shape and fps into one tensor batch.

    Returns:
        One dict of columns per item (``<reward>`` and ``<reward>.<component>``).
    """
    return score_groups(rewards, group_media(media, fps), prompts)


def group_media(
    media: list[torch.Tensor], fps: list[float | None]
) -> list[tuple[list[int], torch.Tensor, Any]]:
    """Items of equal shape, dtype and fps stacked into one batch each: ``(indices, batch, fps)``.

    uint8 media (``load_media_uint8``) stay uint8: a quarter of float32's bytes to move between processes and to
    the reward's device, where ``score_groups`` makes the same k/255 floats that ``load_media`` would have.
    """
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(media):
        groups.setdefault((tuple(m.shape), m.dtype, fps[i]), []).append(i)
    return [
        (idx, torch.stack([media[i] for i in idx]), group_fps) for (_, _, group_fps), idx in groups.items()
    ]


def score_groups(
    rewards: dict[str, Reward], groups: list[tuple[list[int], torch.Tensor, Any]], prompts: list[str]
) -> list[dict[str, Any]]:
    """Score the batches of ``group_media``; a uint8 batch becomes float pixels on each reward's device."""
    results: list[dict[str, Any]] = [{} for idx, _, _ in groups for _ in idx]
    for idx, batch, group_fps in groups:
        for name, reward in rewards.items():
            pixels = batch
            if (
                batch.dtype == torch.uint8
            ):  # the same k/255 floats as decoding to float, made where they are used
                device = getattr(reward, "device", None) or "cpu"
                pixels = batch.to(device, non_blocking=True).float().div_(255)
            for suffix, values in _call_reward(reward, pixels, [prompts[i] for i in idx], group_fps).items():
                values = values.detach().float().cpu()
                for j, i in enumerate(idx):
                    results[i][name + suffix] = _jsonable(values[j])
    return results


def _atomic_write(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(f: Any) -> None:
        if path.suffix.lower() == ".csv":
            columns = list(dict.fromkeys(k for r in rows for k in r))
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in rows:
                writer.writerow(
                    {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()}
                )
        else:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    _replace_atomically(path, write)


def _atomic_write_text(path: Path, text: str) -> None:
    _replace_atomically(path, lambda f: f.write(text))


def _replace_atomically(path: Path, write: Callable[[Any], Any]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_rows(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL (or CSV by extension), atomically (temp file + rename)."""
    _atomic_write(Path(path), rows)


@dataclass
class ScoreSummary:
    """What a scoring run did."""

    total: int = 0
    scored: int = 0
    skipped: int = 0
    errors: int = 0
    out: Path | None = None
    rescored: list[str] = field(default_factory=list)  # columns whose earlier scores had other settings


def _done_columns(rewards: dict[str, Reward]) -> list[str]:
    """The column whose presence marks a row as scored by each reward (a combined reward's raw member scores)."""
    cols = []
    for name, reward in rewards.items():
        if is_combined(reward):
            cols += [f"{name}.{k}" for k in _member_raw_keys(reward)]
        else:
            cols.append(name)
    return cols


def _member_raw_keys(reward: Reward) -> list[str]:
    members = reward.members
    return [f"{m.name if hasattr(m, 'name') else m[0]}/raw" for m in members]


def _row_done(row: dict[str, Any], columns: Sequence[str], sides: Sequence[str]) -> bool:
    if row.get("error"):
        return False
    prefixes = [""] if sides == ["media"] else [s + "." for s in sides]
    return all(row.get(p + n) not in (None, "") for n in columns for p in prefixes)


def score_items(
    items: list[Item],
    rewards: dict[str, Reward],
    out: str | Path,
    *,
    batch_size: int = 16,
    resume: bool = True,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    loader: Callable[[Path], tuple[torch.Tensor, float | None]] = load_media_uint8,
    normalize_over: str | None = None,
    num_workers: int = 0,
    settings: Mapping[str, Any] | None = None,
) -> ScoreSummary:
    """Score items with every reward and write one row per item (see module docstring).

    Args:
        items: From :func:`collect_items`.
        rewards: Column name -> reward.
        out: Output ``.jsonl`` or ``.csv``.
        batch_size: Items decoded and scored together.
        resume: Keep rows of a previous run that have every reward and no error.
        progress: Show a tqdm bar on stderr.
        on_batch: Called with the number of finished batches (tests use it to interrupt a run).
        loader: ``path -> (media, fps)`` decoder, float pixels in [0, 1] or uint8 (converted on each reward's
            device); ``mmalign score`` passes ``mmalign/data/video.py`` sampling for videos.
        normalize_over: For hybrid/ensemble rewards: ``prompt`` (within each prompt group; the default unless
            the reward sets its own) or ``set`` (the whole scored set). Never per batch.
        num_workers: Processes that decode the next batches while the rewards score this one (a DataLoader
            over the same batches, in order, with pinned memory on CUDA). Only decoding moves: the batches, and
            so every score, are those of ``num_workers=0``. ``loader`` must then be picklable.
        settings: Column -> what else its scores depend on (JSON-able). Rows of a previous run whose column was
            scored with other settings (``<out>.settings.json``) are scored again; None: no check.

    Returns:
        A :class:`ScoreSummary`.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    done: dict[
        tuple[str, str], dict[str, Any]
    ] = {}  # keyed by (media id, prompt): one image, two prompts = two rows
    if resume:
        for source in (out, partial):
            if source.is_file():
                for row in read_table(source) if source == out else read_jsonl_lenient(source):
                    if isinstance(row, dict):
                        done[_row_key(row)] = row
    else:
        partial.unlink(missing_ok=True)
    settings_file = out.with_name(out.name + ".settings.json")
    stored = read_settings(settings_file)
    stale = sorted(c for c in settings or {} if c in stored and stored[c] != _jsonable_settings(settings[c]))
    names = _done_columns({c: r for c, r in rewards.items() if c not in stale})
    todo = [
        it
        for it in items
        if not (_item_key(it) in done and not stale and _row_done(done[_item_key(it)], names, list(it.paths)))
    ]
    summary = ScoreSummary(total=len(items), skipped=len(items) - len(todo), out=out, rescored=stale)
    out_dir = out.parent.resolve()
    with (
        partial.open("a") as part,
        tqdm(total=len(todo), disable=not progress, desc="score", unit="item") as bar,
    ):
        chunks = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        decoded = torch.utils.data.DataLoader(
            _DecodedChunks(chunks, out_dir, loader),
            batch_size=None,  # each item is already one scoring batch
            collate_fn=_as_is,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=2 if num_workers else None,
        )
        for b, (chunk, decoded_chunk) in enumerate(zip(chunks, decoded)):
            rows = _score_decoded(decoded_chunk, rewards)
            for row in rows:
                done[_row_key(row)] = row
                summary.errors += bool(row.get("error"))
                part.write(json.dumps(row) + "\n")
            part.flush()
            os.fsync(part.fileno())
            summary.scored += len(chunk)
            bar.update(len(chunk))
            if on_batch is not None:
                on_batch(b + 1)
    final = [done[_item_key(it)] for it in items if _item_key(it) in done]
    combine_rows(final, rewards, normalize_over)
    _mark_agreement(final, rewards)
    write_rows(out, final)
    if (
        settings is not None
    ):  # after the rows: an interrupted run's partial rows are checked against the old ones
        stored.update({c: _jsonable_settings(v) for c, v in settings.items()})
        _atomic_write_text(settings_file, json.dumps(stored, indent=1, sort_keys=True))
    partial.unlink(missing_ok=True)
    return summary


def _jsonable_settings(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def read_settings(path: Path) -> dict[str, Any]:
    """``<out>.settings.json`` of a previous run (empty when missing or unreadable: its rows are then trusted)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stack(values: list[Any], column: str) -> torch.Tensor:
    try:
        return torch.tensor(values, dtype=torch.float32)
    except (ValueError, TypeError):
        raise ValueError(
            f"column {column!r}: per-segment scores of different lengths cannot be normalised together; "
            "score clips of one length per run"
        ) from None


def combine_rows(
    rows: list[dict[str, Any]], rewards: dict[str, Reward], normalize_over: str | None = None
) -> None:
    """Fill each hybrid/ensemble's total and normalised columns from the raw member scores of *all* rows.

    Args:
        rows: Score rows (modified in place); rows with ``error`` are left alone.
        rewards: Column name -> reward; only combined rewards are touched.
        normalize_over: ``prompt`` or ``set``; None: the reward's own setting, else ``prompt``.
    """
    for name, reward in rewards.items():
        if not is_combined(reward):
            continue
        over = normalize_over or getattr(reward, "normalize_over", None) or "prompt"
        raw_keys = [k for k in _member_raw_keys(reward)]
        extra_keys = [k.replace("/raw", "/confidence") for k in raw_keys]
        owners, groups = [], []
        for row in rows:
            if row.get("error"):
                continue
            for prefix in ("", "chosen.", "rejected."):
                if row.get(f"{prefix}{name}.{raw_keys[0]}") is not None:
                    owners.append((row, prefix))
                    groups.append(str(row.get("group") or row.get("prompt") or ""))
        if not owners:
            continue
        raw = {}
        for key in raw_keys + extra_keys:
            values = [row.get(f"{prefix}{name}.{key}") for row, prefix in owners]
            if all(v is not None for v in values):
                raw[key] = _stack(values, f"{name}.{key}")
        parts = reward.combine(raw, groups if over == "prompt" else None)
        for j, (row, prefix) in enumerate(owners):
            for key, value in parts.items():
                column = f"{prefix}{name}" if key == "total" else f"{prefix}{name}.{key}"
                row[column] = _jsonable(value[j])


def _mark_agreement(rows: list[dict[str, Any]], rewards: dict[str, Reward]) -> None:
    for row in rows:
        if "error" in row:
            continue
        for name in rewards:
            c, r = row.get(f"chosen.{name}"), row.get(f"rejected.{name}")
            if isinstance(c, (int, float)) and isinstance(r, (int, float)):
                row[f"{name}.agrees"] = c > r


def _item_key(item: Item) -> tuple[str, str]:
    return str(item.id), str(item.prompt)


def _row_key(row: dict[str, Any]) -> tuple[str, str]:
    return str(row.get("id")), str(row.get("prompt") or "")


def _relpath(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base)).as_posix()


class _DecodedChunks(torch.utils.data.Dataset):
    """Scoring batch ``i`` decoded (rows, media, prompts, fps, owners): what a DataLoader worker does."""

    def __init__(self, chunks: list[list[Item]], out_dir: Path, loader: Callable) -> None:
        self.chunks, self.out_dir, self.loader = chunks, out_dir, loader

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> tuple:
        return _decode_chunk(self.chunks[i], self.out_dir, self.loader)


def _as_is(x: Any) -> Any:
    return x


def _decode_chunk(
    chunk: list[Item], out_dir: Path, loader: Callable[[Path], tuple[torch.Tensor, float | None]]
) -> tuple[list[dict[str, Any]], list[tuple[list[int], torch.Tensor, Any]], list[str], list[tuple[int, str]]]:
    rows: list[dict[str, Any]] = []
    flat_media, flat_prompts, flat_fps, owner = [], [], [], []
    for k, item in enumerate(chunk):
        row: dict[str, Any] = {"id": str(item.id), "prompt": item.prompt}
        row.update(
            {("path" if side == "media" else side): _relpath(p, out_dir) for side, p in item.paths.items()}
        )
        row.update(item.extra)
        loaded = []
        try:
            for side, p in item.paths.items():
                m, fps = loader(p)
                loaded.append((side, m, fps))
        except ValueError as e:
            row["error"] = str(e)
            loaded = []
        for side, m, fps in loaded:
            flat_media.append(m)
            flat_prompts.append(item.prompt)
            flat_fps.append(fps)
            owner.append((k, side))
        rows.append(row)
    return rows, group_media(flat_media, flat_fps), flat_prompts, owner  # stacked here, in the worker


def _score_decoded(decoded: tuple, rewards: dict[str, Reward]) -> list[dict[str, Any]]:
    rows, groups, flat_prompts, owner = decoded
    if groups:
        for (k, side), cols in zip(owner, score_groups(rewards, groups, flat_prompts)):
            prefix = "" if side == "media" else side + "."
            rows[k].update({prefix + c: v for c, v in cols.items()})
    return rows
