"""Video preference pairs with per-segment labels, and the mapping of segment labels onto latent frames.

A video pair is two clips of one prompt (for DenseDPO, StructuralDPO pairs that share their motion) and
one label per segment of ``segment_seconds`` (default 1 s): +1 video 0 better, -1 video 1 better, 0 tie.
Manifest rows (JSONL or CSV with ``labels`` as a JSON list)::

    {"prompt": "a red circle moving", "video_0": "a.mp4", "video_1": "b.mp4", "labels": [1, 0, -1, 1]}

optionally with ``segment_seconds`` (per row) or ``segments`` (explicit ``[[start, end], ...]`` seconds, one per
label, as ``mmalign annotate export`` writes for a manifest that gave them; a frame belongs to the last segment
starting at or before it), and ``label`` (the whole-clip label; default: the majority of the segment labels).

**Segments -> latent frames.** Frame f (timestamp t_f) belongs to segment ``min(floor(t_f / s), S - 1)``
with ``S = max(1, round(duration / s))`` (so 121 frames at 24 fps make 5 segments, not 5 plus a one-frame
sixth). A video VAE with temporal compression c maps frames to latents:

- c = 1: latent j <- frame j;
- causal c (CogVideoX/Wan/HunyuanVideo 4, Mochi 6, LTX 8): latent 0 <- frame 0, latent j <- frames
  c(j-1)+1 .. cj, so 4k+1 frames give k+1 latents (9 -> 3 with c = 4; Mochi 7 -> 2);
- non-causal c: latent j <- frames cj .. cj+c-1.

A latent frame whose frames fall in more than one segment straddles a boundary. ``straddle="majority"`` (the
default) gives it the label that holds a strict majority of its frames (3 of 4 for a 4x causal VAE) and a tie on
a 2-2 split between different labels; ``"tie"`` (DESIGN §3) makes every straddling latent a tie, which with
1-second segments and a causal 4x VAE ties 5 of CogVideoX's 13 latents (49 frames at 8 fps) and 4 of Wan's 21
(81 at 16 fps) even when every segment is labelled; ``"agree"`` keeps it when all its segments share one label.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign.data.images import DataError
from mmalign.data.pairs import collate_pairs
from mmalign.limits import MediaError, file_digest
from mmalign.utils import TEXT_ENCODING, short_hash

# --------------------------------------------------------------------------------------------------
# segment arithmetic


def explicit_frame_segments(
    timestamps: torch.Tensor | Sequence[float], segments: Sequence[tuple[float, float]]
) -> torch.Tensor:
    """Segment index [N] of each frame for explicit ``[start, end)`` bounds in seconds (a manifest's ``segments``):
    the last segment starting at or before the frame (the first one for frames before it; a frame in a gap
    between two segments stays with the earlier one)."""
    ts = torch.as_tensor(timestamps, dtype=torch.float64)
    starts = torch.tensor([a for a, _ in segments], dtype=torch.float64)
    return (torch.bucketize(ts + 1e-9, starts, right=True) - 1).clamp(min=0)


def num_segments(duration: float, segment_seconds: float = 1.0) -> int:
    """Segments of ``segment_seconds`` in a clip of ``duration`` seconds (at least one)."""
    if segment_seconds <= 0:
        raise ValueError(f"segment_seconds={segment_seconds} must be > 0")
    return max(1, round(duration / segment_seconds + 1e-9))


def frame_segments(
    timestamps: torch.Tensor | Sequence[float], segment_seconds: float = 1.0, duration: float | None = None
) -> torch.Tensor:
    """Segment index of every frame, [N] long.

    Args:
        timestamps: [N] frame times in seconds (``torch.arange(N) / fps`` for a constant rate).
        segment_seconds: segment length s.
        duration: clip length in seconds; default: last timestamp + one median frame interval.
    """
    ts = torch.as_tensor(timestamps, dtype=torch.float64).flatten()
    if duration is None:
        step = ts.diff().median().item() if ts.numel() > 1 else 1.0
        duration = ts[-1].item() + step
    count = num_segments(duration, segment_seconds)
    return torch.floor(ts / segment_seconds + 1e-9).long().clamp(0, count - 1)


def latent_frame_groups(num_frames: int, compression: int, causal: bool = True) -> list[range]:
    """Which pixel frames each latent frame encodes (see the module docstring)."""
    if compression < 1 or num_frames < 1:
        raise ValueError(f"need compression >= 1 and num_frames >= 1, got {compression}, {num_frames}")
    if compression == 1:
        return [range(f, f + 1) for f in range(num_frames)]
    if causal:
        n_lat = 1 + (num_frames - 1) // compression
        return [range(0, 1)] + [
            range(compression * (j - 1) + 1, compression * j + 1) for j in range(1, n_lat)
        ]
    n_lat = num_frames // compression
    return [range(compression * j, compression * (j + 1)) for j in range(n_lat)]


STRADDLE = ("majority", "tie", "agree")


def latent_labels(
    segment_labels: torch.Tensor | Sequence[int],
    frame_segment: torch.Tensor,
    compression: int = 1,
    causal: bool = True,
    straddle: str = "majority",
) -> torch.Tensor:
    """Per-latent-frame labels [T_lat] from per-segment labels [S] and each frame's segment [N].

    Args:
        segment_labels: [S] in {+1, 0, -1}.
        frame_segment: [N] segment index of each pixel frame (:func:`frame_segments`).
        compression: the VAE's temporal compression c.
        causal: causal VAE (first latent holds frame 0 alone), as CogVideoX, Wan, Mochi, LTX.
        straddle: ``majority`` (a latent covering frames of two segments takes the label of a strict majority
            of its frames, else tie), ``tie`` (always a tie) or ``agree`` (kept when its segments share one label).
    """
    if straddle not in STRADDLE:
        raise ValueError(f"straddle={straddle!r}: use one of {STRADDLE}")
    seg = torch.as_tensor(segment_labels, dtype=torch.long).flatten()
    frame_segment = torch.as_tensor(frame_segment, dtype=torch.long).flatten()
    if int(frame_segment.max()) >= seg.numel():
        raise ValueError(
            f"frames reach segment {int(frame_segment.max())} but only {seg.numel()} segment labels were given"
        )
    out = []
    for frames in latent_frame_groups(frame_segment.numel(), compression, causal):
        frame_labels = seg[frame_segment[list(frames)]]
        segs = frame_segment[list(frames)].unique()
        labs = frame_labels.unique()
        if len(segs) == 1 or (straddle in ("agree", "majority") and len(labs) == 1):
            out.append(int(labs[0]))
        elif straddle == "majority":
            values, counts = labs, torch.stack([(frame_labels == v).sum() for v in labs])
            top = int(counts.argmax())
            out.append(int(values[top]) if 2 * int(counts[top]) > len(frames) else 0)
        else:
            out.append(0)
    return torch.tensor(out, dtype=torch.long)


def clip_label(segment_labels: torch.Tensor | Sequence[int]) -> int:
    """Whole-clip label by majority over the non-tie segments (+1, -1, or 0 when they balance)."""
    total = int(torch.as_tensor(segment_labels, dtype=torch.long).sum())
    return (total > 0) - (total < 0)


def non_tie_fraction(segment_labels: torch.Tensor | Sequence[int]) -> float:
    lab = torch.as_tensor(segment_labels)
    return (
        int((lab != 0).sum()) / lab.numel() if lab.numel() else 0.0
    )  # exact: 1 of 5 is 0.2, not 0.2000000030


def labels_from_scores(scores_0: torch.Tensor, scores_1: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Per-segment labels from per-segment rewards [B,S] of each video (higher = better): a difference
    within ``margin`` is a tie."""
    diff = scores_0 - scores_1
    return (diff > margin).long() - (diff < -margin).long()


def consistent_labels(first_order: torch.Tensor, swapped_order: torch.Tensor) -> torch.Tensor:
    """Order-swap consistency (DenseDPO App. A.6): ``first_order`` labels judged as (video 0, video 1),
    ``swapped_order`` as (video 1, video 0) in the judge's frame; agreement keeps the label, else tie."""
    flipped = -swapped_order
    return torch.where(first_order == flipped, first_order, torch.zeros_like(first_order))


# --------------------------------------------------------------------------------------------------
# manifest


@dataclass
class VideoPairRecord:
    """One video pair: per-segment ``labels`` relative to ``video_0`` (+1 = video 0 better)."""

    prompt: str
    video_0: str
    video_1: str
    labels: list[int]
    row: str  # "pairs.jsonl:3", for error messages
    segment_seconds: float | None = None
    label: int | None = None  # whole-clip label; default: majority of ``labels``
    extra: dict = field(default_factory=dict)
    segments: list[tuple[float, float]] | None = None  # explicit [start, end) seconds, one per label

    @property
    def clip_label(self) -> int:
        return self.label if self.label is not None else clip_label(self.labels)


def _record(row: dict, where: str, base: Path) -> VideoPairRecord:
    missing = [k for k in ("prompt", "video_0", "video_1", "labels") if row.get(k) in (None, "")]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing}; a video pair row needs prompt, video_0, video_1, labels"
        )
    labels = row["labels"]
    if isinstance(labels, str):
        try:
            labels = json.loads(labels)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where}: labels={row['labels']!r} is not a JSON list such as [1, 0, -1]"
            ) from err
    if not isinstance(labels, list) or not labels or any(v not in (-1, 0, 1) for v in labels):
        raise DataError(f"{where}: labels must be a non-empty list of +1 / 0 / -1, got {row['labels']!r}")

    def path(key: str) -> str:
        p = Path(str(row[key]))
        return str(p if p.is_absolute() else base / p)

    seg = row.get("segment_seconds")
    label = row.get("label")
    if label not in (None, "") and int(label) not in (-1, 0, 1):
        raise DataError(f"{where}: label={label!r} must be +1, 0 or -1")
    segments = _segments(row.get("segments"), len(labels), where)
    if segments is not None and seg not in (None, ""):
        raise DataError(f"{where}: give segment_seconds or segments, not both")
    extra = {
        k: v
        for k, v in row.items()
        if k not in ("prompt", "video_0", "video_1", "labels", "segment_seconds", "label", "segments")
    }
    return VideoPairRecord(
        str(row["prompt"]),
        path("video_0"),
        path("video_1"),
        [int(v) for v in labels],
        where,
        float(seg) if seg not in (None, "") else None,
        int(label) if label not in (None, "") else None,
        extra,
        segments,
    )


def _segments(value: Any, n_labels: int, where: str) -> list[tuple[float, float]] | None:
    """A row's explicit ``segments`` (``[[start, end], ...]`` in seconds, what ``mmalign annotate`` exports for a
    manifest that gave them), checked: one per label, each start < end, in order without overlap."""
    if value in (None, ""):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    try:
        bounds = [(float(a), float(b)) for a, b in value]
    except (TypeError, ValueError):
        raise DataError(
            f"{where}: segments must be a list of [start, end] seconds, got {value!r:.120}"
        ) from None
    if len(bounds) != n_labels:
        raise DataError(f"{where}: {n_labels} labels but {len(bounds)} segments; give one label per segment")
    for i, (a, b) in enumerate(bounds):
        if not (math.isfinite(a) and math.isfinite(b) and 0 <= a < b) or (i and a < bounds[i - 1][1] - 1e-6):
            raise DataError(
                f"{where}: segment {i} = [{a:g}, {b:g}] must start before it ends, at or after the previous end"
            )
    return bounds


def load_video_pairs(source: str | Path, max_items: int | None = None) -> list[VideoPairRecord]:
    """Read a JSONL or CSV manifest of video pairs (paths relative to the manifest's folder)."""
    source = Path(source)
    if not source.is_file():
        raise DataError(f"{source}: video pair manifest not found")
    rows: list[tuple[str, dict]] = []
    if source.suffix == ".csv":
        with source.open(newline="", encoding=TEXT_ENCODING) as fh:
            rows = [(f"{source}:{i}", r) for i, r in enumerate(csv.DictReader(fh), start=2)]
    else:
        for i, line in enumerate(source.read_text(encoding=TEXT_ENCODING).splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"{source}:{i}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise DataError(f"{source}:{i}: not valid JSON: {err}") from err
    records = [_record(r, where, source.parent) for where, r in rows]
    return records[:max_items] if max_items else records


def keep_record(rec: VideoPairRecord, *, dense: bool, min_non_tie: float = 0.2) -> bool:
    """DenseDPO trains on clips with more than ``min_non_tie`` non-tie segments; vanilla DPO drops clip ties."""
    return non_tie_fraction(rec.labels) > min_non_tie if dense else rec.clip_label != 0


# --------------------------------------------------------------------------------------------------
# decoding a pair to model-ready pixels


def fit_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize the short side (bilinear, antialiased) and centre-crop to (height, width); [T,3,H,W] in [0,1] -> [-1,1]."""
    from torchvision.transforms.functional import InterpolationMode, resize

    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    size = [max(height, round(h * scale)), max(width, round(w * scale))]
    x = resize(frames, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width].mul(2).sub(1)


def decode_video_pair(
    rec: VideoPairRecord,
    *,
    height: int,
    width: int,
    fps: float | None,
    num_frames: int | None,
    segment_seconds: float,
    compression: int,
    causal: bool,
    straddle: str = "majority",
    backend: str | None = None,
) -> dict[str, Any]:
    """Both clips as pixels [T,3,H,W] in [-1,1] plus latent-frame labels [T_lat] and the clip label."""
    from mmalign.data.video import read_video

    clips = []
    for key in ("video_0", "video_1"):
        try:
            clips.append(read_video(getattr(rec, key), fps=fps, num_frames=num_frames, backend=backend))
        except DataError as err:
            raise DataError(f"{rec.row} ({key}): {err}") from err
    if clips[0].frames.shape[0] != clips[1].frames.shape[0]:
        raise DataError(
            f"{rec.row}: the two videos give {clips[0].frames.shape[0]} and {clips[1].frames.shape[0]} frames; "
            "a pair must have the same length (set method.num_frames)"
        )
    n_total = clips[0].frames.shape[0]
    duration = n_total / clips[0].fps
    if rec.segments is not None:  # explicit bounds: each frame in the last segment starting at or before it
        frame_seg = explicit_frame_segments(clips[0].timestamps, rec.segments)
    else:
        seg_s = rec.segment_seconds or segment_seconds
        frame_seg = frame_segments(clips[0].timestamps - clips[0].timestamps[0], seg_s, duration)
        if len(rec.labels) < int(frame_seg.max()) + 1:
            raise DataError(
                f"{rec.row}: {len(rec.labels)} segment labels but the clip ({duration:.2f} s, "
                f"{seg_s} s segments) has {num_segments(duration, seg_s)} segments"
            )
    lat = latent_labels(rec.labels, frame_seg, compression, causal, straddle)
    return {
        "pixels_0": fit_frames(clips[0].frames, height, width),
        "pixels_1": fit_frames(clips[1].frames, height, width),
        "labels": lat,
        "clip_label": rec.clip_label,
    }


# --------------------------------------------------------------------------------------------------
# cache of VAE posterior moments and text embeddings (one safetensors file per item)


class VideoLatentCache:
    """Posterior moments of both clips of each pair and the prompts' embeddings, one file per entry.

    The directory is keyed by a fingerprint (model, VAE config, size, frame sampling, segment rule); an
    item by the bytes of both files and its labels. Files are written under a temporary name and
    renamed, so an interrupted build resumes and a reader never sees half a file.
    """

    def __init__(self, root: str | Path, fingerprint: dict[str, Any]):
        blob = json.dumps(fingerprint, sort_keys=True, default=str)
        self.dir = Path(root) / f"video-{short_hash(blob)}"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "fingerprint.json").write_text(
            json.dumps(fingerprint, indent=1, sort_keys=True, default=str)
        )

    def item_key(self, rec: VideoPairRecord) -> str:
        parts = []
        for key in ("video_0", "video_1"):
            try:
                parts.append(
                    file_digest(getattr(rec, key)).hex()[:20]
                )  # == short_hash(the bytes), read in blocks
            except MediaError as err:
                raise DataError(f"{rec.row} ({key}): {err}") from None
        fields = [rec.labels, rec.segment_seconds, rec.label]
        fields += [rec.segments] if rec.segments is not None else []  # keys of rows without them as before
        return short_hash("".join(parts) + json.dumps(fields))

    def _save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tmp = self.dir / f".{name}.{os.getpid()}.tmp"  # per process: concurrent runs may encode the same item
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.dir / name)

    def has(self, name: str) -> bool:
        return (self.dir / name).is_file()

    def load(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.dir / name))

    def labels(self, name: str) -> torch.Tensor:
        """The latent-frame labels of a cached item (read alone, not its moments)."""
        from safetensors import safe_open

        with safe_open(str(self.dir / name), framework="pt") as fh:
            return fh.get_tensor("labels")

    def text_name(self, prompt: str) -> str:
        return f"text-{short_hash(prompt)}.safetensors"

    def build(
        self,
        records: list[VideoPairRecord],
        adapter: Any,
        decode_kwargs: dict[str, Any],
        *,
        random_flip: bool,
        skip_bad: bool,
        prompts_extra: tuple[str, ...] = ("",),
        progress: bool = True,
    ) -> tuple[list[VideoPairRecord], list[str], list[str]]:
        """Encode what is missing. Returns (usable records, their item file names, skipped-item messages)."""
        from tqdm.auto import tqdm

        keep, names, skipped = [], [], []
        for rec in tqdm(records, desc="caching video latents", disable=not progress):
            try:
                name = f"item-{self.item_key(rec)}.safetensors"
                if not self.has(name):
                    item = decode_video_pair(rec, **decode_kwargs)
                    pix = torch.stack([item["pixels_0"], item["pixels_1"]])  # [2,T,3,H,W]
                    tensors = {"labels": item["labels"], "clip_label": torch.tensor(item["clip_label"])}
                    for suffix, x in ({"": pix, "f": pix.flip(-1)} if random_flip else {"": pix}).items():
                        mean, std = adapter.latent_moments(x)
                        tensors.update(
                            {
                                f"mean_0{suffix}": mean[0],
                                f"std_0{suffix}": std[0],
                                f"mean_1{suffix}": mean[1],
                                f"std_1{suffix}": std[1],
                            }
                        )
                    if tensors["labels"].numel() != mean.shape[2]:
                        raise DataError(
                            f"{rec.row}: {tensors['labels'].numel()} latent labels for {mean.shape[2]} latent "
                            f"frames; the VAE's temporal compression is not what the adapter reports"
                        )
                    self._save(name, tensors)
            except DataError as err:
                if not skip_bad:
                    raise
                skipped.append(str(err))
                continue
            keep.append(rec)
            names.append(name)
        todo = sorted({r.prompt for r in keep} | set(prompts_extra))
        todo = [p for p in todo if not self.has(self.text_name(p))]
        for start in range(0, len(todo), 32):
            chunk = todo[start : start + 32]
            cond = adapter.encode_prompts(chunk)
            for i, p in enumerate(chunk):
                self._save(self.text_name(p), {k: v[i] for k, v in cond.items()})
        return keep, names, skipped


class CachedVideoPairDataset(torch.utils.data.Dataset):
    """Video pairs served from :class:`VideoLatentCache` (a horizontal flip drawn per item when cached)."""

    def __init__(
        self, records: list[VideoPairRecord], names: list[str], cache: VideoLatentCache, *, random_flip: bool
    ):
        self.records, self.names, self.cache, self.random_flip = records, names, cache, random_flip

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        data = self.cache.load(self.names[i])
        f = "f" if self.random_flip and bool(torch.rand(()) < 0.5) else ""
        item = {k: data[f"{k}{f}"] for k in ("mean_0", "std_0", "mean_1", "std_1")}
        item.update(
            labels=data["labels"],
            clip_label=data["clip_label"],
            prompt=self.records[i].prompt,
            item_id=self.records[i].row,
        )
        return item


class VideoPairDataset(torch.utils.data.Dataset):
    """Uncached video pairs (``data.cache=false``): decoded per item, encoded by the trainer each step."""

    def __init__(
        self,
        records: list[VideoPairRecord],
        decode_kwargs: dict[str, Any],
        *,
        random_flip: bool,
        skip_bad: bool,
        min_non_tie: float | None = None,
    ):
        self.records, self.decode_kwargs, self.random_flip, self.skip_bad = (
            records,
            decode_kwargs,
            random_flip,
            skip_bad,
        )
        self.min_non_tie = min_non_tie

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        try:
            item = decode_video_pair(rec, **self.decode_kwargs)
        except DataError as err:
            if not self.skip_bad:
                raise
            return {"skipped": str(err)}
        if self.min_non_tie is not None and non_tie_fraction(item["labels"]) <= self.min_non_tie:
            return {
                "skipped": f"{rec.row}: {non_tie_fraction(item['labels']):.0%} of its latent frames carry a label "
                f"(DenseDPO needs more than {self.min_non_tie:.0%})"
            }
        if self.random_flip and bool(torch.rand(()) < 0.5):
            item["pixels_0"], item["pixels_1"] = item["pixels_0"].flip(-1), item["pixels_1"].flip(-1)
        item["clip_label"] = torch.tensor(item["clip_label"])
        item.update(prompt=rec.prompt, item_id=rec.row)
        return item


def collate_video_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, list everything else; unreadable items (``skipped``) are listed, not stacked."""
    return collate_pairs(items)
