"""Rule rewards: closed-form measurements of pixels, no model.

Image rules take [B,3,H,W] (videos [B,T,3,H,W] are averaged over frames) and return [B]; higher is better
unless a ``target`` is given, in which case the reward is ``-|measure - target|``. Video rules measure time:
duration and frame rate (from the clip's fps), temporal flicker and motion magnitude, optionally per
segment ([B,S]), which is what DenseDPO's segment labels need.

A rule may also expose ``confidence(media, prompts) -> [B]`` in [0, 1] (``color_match`` is confident only
when the prompt names a colour); a hybrid uses it to gate the component.

Video rules accept the clip's frame rate as an optional ``fps=`` call keyword (``mmalign score`` passes the
decoded file's rate to rewards whose ``accepts_fps`` attribute is true); otherwise the constructor's ``fps``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mmalign.rewards.preprocess import video_to_frames

LUMA = (0.299, 0.587, 0.114)  # Rec. 601

DEFAULT_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.8, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "orange": (1.0, 0.55, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "pink": (1.0, 0.6, 0.8),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
    "grey": (0.5, 0.5, 0.5),
    "cyan": (0.0, 1.0, 1.0),
    "brown": (0.55, 0.27, 0.07),
}


def luma(frames: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] -> [N,H,W] Rec. 601 luma."""
    w = torch.tensor(LUMA, device=frames.device, dtype=frames.dtype).view(1, 3, 1, 1)
    return (frames * w).sum(1)


def _per_image(measure: Callable[[torch.Tensor], torch.Tensor], media: torch.Tensor) -> torch.Tensor:
    frames, t = video_to_frames(media)
    return measure(frames).view(-1, t).mean(1)


@dataclass
class ImageRule:
    """A per-image measurement as a reward: ``measure`` or ``-|measure - target|``.

    Attributes:
        measure: [N,3,H,W] -> [N].
        target: If set, reward closeness to it instead of the raw measure.
        name: For messages.
    """

    measure: Callable[[torch.Tensor], torch.Tensor]
    target: float | None = None
    name: str = "rule"

    def __call__(self, media: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Args: media [B,3,H,W] or [B,T,3,H,W] in [0, 1]; prompts unused. Returns [B]."""
        value = _per_image(self.measure, media.float())
        return value if self.target is None else -(value - self.target).abs()


def _brightness(frames: torch.Tensor) -> torch.Tensor:
    return luma(frames).mean((-2, -1))


def _saturation(frames: torch.Tensor) -> torch.Tensor:
    mx, mn = frames.amax(1), frames.amin(1)
    return ((mx - mn) / mx.clamp_min(1e-6)).mean((-2, -1))  # HSV saturation


def _contrast(frames: torch.Tensor) -> torch.Tensor:
    return luma(frames).flatten(1).std(1, unbiased=False)  # RMS contrast


def _sharpness(frames: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor(
        [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=frames.device, dtype=frames.dtype
    ).view(1, 1, 3, 3)
    lap = F.conv2d(luma(frames).unsqueeze(1), kernel)
    return lap.flatten(1).var(1, unbiased=False)  # variance of the Laplacian


def _colorfulness(frames: torch.Tensor) -> torch.Tensor:
    r, g, b = frames.unbind(1)
    rg, yb = r - g, 0.5 * (r + g) - b
    std = (rg.flatten(1).var(1, unbiased=False) + yb.flatten(1).var(1, unbiased=False)).sqrt()
    mean = (rg.flatten(1).mean(1) ** 2 + yb.flatten(1).mean(1) ** 2).sqrt()
    return std + 0.3 * mean  # Hasler & Suesstrunk 2003, on [0, 1] pixels


def brightness(target: float | None = None) -> ImageRule:
    """Mean Rec. 601 luma in [0, 1] (or -|luma - target|)."""
    return ImageRule(_brightness, target, "brightness")


def saturation(target: float | None = None) -> ImageRule:
    """Mean HSV saturation in [0, 1] (or -|sat - target|)."""
    return ImageRule(_saturation, target, "saturation")


def contrast(target: float | None = None) -> ImageRule:
    """RMS contrast: std of luma (or -|std - target|)."""
    return ImageRule(_contrast, target, "contrast")


def sharpness(target: float | None = None) -> ImageRule:
    """Variance of the Laplacian of luma (higher = sharper; noise also raises it)."""
    return ImageRule(_sharpness, target, "sharpness")


def colorfulness(target: float | None = None) -> ImageRule:
    """Hasler-Suesstrunk colourfulness on [0, 1] pixels."""
    return ImageRule(_colorfulness, target, "colorfulness")


@dataclass
class ColorMatch:
    """``1 - ||mean RGB - target colour|| / sqrt(3)`` where the target is named in the prompt.

    Attributes:
        colors: Colour word -> RGB in [0, 1]; the first word of the prompt found here is the target.
        target: Fixed RGB target instead of parsing prompts.
    """

    colors: dict[str, tuple[float, float, float]] = field(default_factory=lambda: dict(DEFAULT_COLORS))
    target: tuple[float, float, float] | None = None

    def _targets(self, prompts: Sequence[str]) -> list[tuple[float, float, float] | None]:
        if self.target is not None:
            return [tuple(self.target)] * len(prompts)
        out = []
        for p in prompts:
            words = [w.strip(".,;:!?") for w in p.lower().split()]
            out.append(next((self.colors[w] for w in words if w in self.colors), None))
        return out

    def __call__(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Args: media [B,3,H,W] or videos; prompts B strings. Returns [B]; 0 where no colour is named."""
        frames, t = video_to_frames(media.float())
        rgb = frames.mean((-2, -1)).view(-1, t, 3).mean(1)
        targets = self._targets(prompts)
        tgt = torch.tensor([tg or (0.0, 0.0, 0.0) for tg in targets], device=rgb.device, dtype=rgb.dtype)
        score = 1.0 - (rgb - tgt).norm(dim=-1) / math.sqrt(3.0)
        known = torch.tensor([tg is not None for tg in targets], device=rgb.device)
        return torch.where(known, score, torch.zeros_like(score))

    def confidence(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """[B]: 1 where the prompt names a known colour (or a fixed target is set), else 0."""
        return torch.tensor([float(tg is not None) for tg in self._targets(prompts)], device=media.device)


def color_match(
    target: Sequence[float] | None = None, colors: dict[str, Sequence[float]] | None = None
) -> ColorMatch:
    """Closeness of the mean colour to the colour the prompt names (confidence 0 when it names none)."""
    palette = {k: tuple(v) for k, v in (colors or DEFAULT_COLORS).items()}
    return ColorMatch(palette, tuple(target) if target is not None else None)


@dataclass
class JpegSize:
    """JPEG file size in kB at ``quality`` (ddpo-pytorch's jpeg (in)compressibility). Not differentiable.

    Attributes:
        quality: JPEG quality.
        sign: +1 rewards size (detail), -1 rewards compressibility.
    """

    quality: int = 95
    sign: float = 1.0

    def __call__(self, media: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Args: media [B,3,H,W] or videos in [0, 1]. Returns [B] (kB, mean over frames)."""
        from PIL import Image

        frames, t = video_to_frames(media.detach().float().cpu())
        arr = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        sizes = []
        for a in arr:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return self.sign * torch.tensor(sizes, device=media.device).view(-1, t).mean(1)


def jpeg_size(quality: int = 95) -> JpegSize:
    """JPEG size in kB (higher = more detail; ddpo-pytorch jpeg_incompressibility)."""
    return JpegSize(quality, 1.0)


def jpeg_compressibility(quality: int = 95) -> JpegSize:
    """Negative JPEG size in kB (higher = more compressible; ddpo-pytorch jpeg_compressibility)."""
    return JpegSize(quality, -1.0)


@dataclass
class ShapeRule:
    """A reward of the media's spatial shape: ``score(H, W)`` broadcast to [B]."""

    score: Callable[[int, int], float]

    def __call__(self, media: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Args: media [B,3,H,W] or [B,T,3,H,W]. Returns [B]."""
        h, w = media.shape[-2:]
        return torch.full((media.shape[0],), float(self.score(h, w)), device=media.device)


def resolution(min_side: int = 512) -> ShapeRule:
    """``min(1, min(H, W) / min_side)``: 1 once the short side reaches ``min_side``."""
    return ShapeRule(lambda h, w: min(1.0, min(h, w) / min_side))


def aspect_ratio(target: float = 1.0) -> ShapeRule:
    """``exp(-|log((W/H) / target)|)``: 1 at the target width/height ratio."""
    return ShapeRule(lambda h, w: math.exp(-abs(math.log((w / h) / target))))


def _segments(
    n_frames: int, fps: float | None, segment_frames: int | None, segment_seconds: float | None
) -> int:
    """Frames per segment, or 0 for one score per clip."""
    if segment_frames:
        return int(segment_frames)
    if segment_seconds:
        if not fps:
            raise ValueError("segment_seconds needs the clip's fps (pass fps= to the rule or the call)")
        return max(1, int(round(segment_seconds * fps)))
    return 0


def _pool_segments(
    per_frame: torch.Tensor, frame_index: torch.Tensor, seg: int, n_frames: int
) -> torch.Tensor:
    """Average per-frame values [B,K] (K values located at frames ``frame_index``) into [B] or [B,S]."""
    if not seg:
        return per_frame.mean(1)
    # DenseDPO's count (data.segments.num_segments, which rewards cannot import): a tail shorter than half a
    # segment joins the last one, so the S scores line up with the S segment labels of the same clip
    n_seg = max(1, round(n_frames / seg + 1e-9))
    seg_of = (frame_index // seg).clamp(max=n_seg - 1).to(per_frame.device)
    out = torch.zeros(per_frame.shape[0], n_seg, device=per_frame.device, dtype=per_frame.dtype)
    count = torch.zeros(n_seg, device=per_frame.device, dtype=per_frame.dtype)
    out.index_add_(1, seg_of, per_frame)
    count.index_add_(0, seg_of, torch.ones_like(seg_of, dtype=per_frame.dtype))
    return out / count.clamp_min(1)


@dataclass
class TemporalRule:
    """Flicker or motion of videos [B,T,3,H,W], per clip [B] or per segment [B,S].

    Attributes:
        kind: ``flicker``: mean |second temporal difference| of pixels (reward = -energy, 0 = steady; smooth
            motion is not penalised), or ``motion``: mean |first temporal difference| (reward = magnitude).
        fps: Clip frame rate for ``segment_seconds`` (a call's ``fps=`` overrides).
        segment_frames: Frames per segment; returns [B,S].
        segment_seconds: Seconds per segment (DenseDPO: 1 s); returns [B,S].
    """

    kind: str = "flicker"
    fps: float | None = None
    segment_frames: int | None = None
    segment_seconds: float | None = None
    accepts_fps: bool = True

    def __call__(
        self, media: torch.Tensor, prompts: Sequence[str] | None = None, fps: float | None = None
    ) -> torch.Tensor:
        """Args: media [B,T,3,H,W] in [0, 1]; fps of the clip. Returns [B] or [B,S]."""
        if media.ndim != 5:
            raise ValueError(f"{self.kind} needs videos [B,T,3,H,W], got shape {tuple(media.shape)}")
        x = media.float()
        t = x.shape[1]
        seg = _segments(t, fps or self.fps, self.segment_frames, self.segment_seconds)
        if self.kind == "motion":
            if t < 2:
                raise ValueError("motion needs at least 2 frames")
            per = (x[:, 1:] - x[:, :-1]).abs().mean((2, 3, 4))
            return _pool_segments(per, torch.arange(1, t), seg, t)
        if t < 3:
            raise ValueError("flicker needs at least 3 frames")
        per = (x[:, 2:] - 2 * x[:, 1:-1] + x[:, :-2]).abs().mean((2, 3, 4))
        return -_pool_segments(per, torch.arange(1, t - 1), seg, t)


def flicker(
    fps: float | None = None, segment_frames: int | None = None, segment_seconds: float | None = None
) -> TemporalRule:
    """Negative temporal flicker energy (mean |x[t+1] - 2x[t] + x[t-1]|), per clip or per segment."""
    return TemporalRule("flicker", fps, segment_frames, segment_seconds)


def motion(
    fps: float | None = None, segment_frames: int | None = None, segment_seconds: float | None = None
) -> TemporalRule:
    """Motion magnitude (mean |x[t+1] - x[t]|), per clip or per segment."""
    return TemporalRule("motion", fps, segment_frames, segment_seconds)


class ClipRate(float):
    """The frame rate of decoded clip frames (what per-segment rules count seconds by), carrying the source file's
    own frame rate and duration, which ``--video-fps`` resampling and ``--video-frames`` sampling change: the
    timing rules (``duration``, ``frame_rate``) judge the file by them. Equal only with the same three values, so
    clips of one length are batched together."""

    def __new__(
        cls, fps: float, source_fps: float | None = None, source_duration: float | None = None
    ) -> ClipRate:
        rate = super().__new__(cls, fps)
        rate.source_fps, rate.source_duration = source_fps, source_duration
        return rate

    def _key(self) -> tuple:
        return float(self), self.source_fps, self.source_duration

    def __eq__(self, other: object) -> bool:
        return self._key() == (other._key() if isinstance(other, ClipRate) else (other, None, None))

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self) -> tuple:  # DataLoader workers send it back pickled
        return ClipRate, self._key()


@dataclass
class ClipTimingRule:
    """Duration or frame-rate reward from the clip length T and its fps (a :class:`ClipRate`'s source file's
    length and rate when it carries them: what ``mmalign score`` passes for decoded video files).

    Attributes:
        kind: ``duration``: ``exp(-|T/fps - target| / tolerance)``; ``frame_rate``: ``min(1, fps/target)``.
        target: Target seconds (duration) or frames per second (frame_rate).
        tolerance: Seconds of deviation that cost a factor e (duration).
        fps: The clip's frame rate when the call gives none.
    """

    kind: str
    target: float
    tolerance: float = 1.0
    fps: float | None = None
    accepts_fps: bool = True

    def __call__(
        self, media: torch.Tensor, prompts: Sequence[str] | None = None, fps: float | None = None
    ) -> torch.Tensor:
        """Args: media [B,T,3,H,W]; fps of the clip. Returns [B]."""
        if media.ndim != 5:
            raise ValueError(f"{self.kind} needs videos [B,T,3,H,W], got shape {tuple(media.shape)}")
        rate = fps or self.fps
        if not rate:
            raise ValueError(f"{self.kind} needs the clip's fps: pass fps= to the factory or the call")
        # the file's own rate and length when the frames were resampled from it (ClipRate), else these frames'
        source_fps = getattr(rate, "source_fps", None) or float(rate)
        seconds = getattr(rate, "source_duration", None) or media.shape[1] / float(rate)
        if self.kind == "duration":
            value = math.exp(-abs(seconds - self.target) / self.tolerance)
        else:
            value = min(1.0, source_fps / self.target)
        return torch.full((media.shape[0],), value, device=media.device)


def duration(
    target_seconds: float = 4.0, tolerance_seconds: float = 1.0, fps: float | None = None
) -> ClipTimingRule:
    """``exp(-|T/fps - target_seconds| / tolerance_seconds)``: 1 at the target duration."""
    return ClipTimingRule("duration", target_seconds, tolerance_seconds, fps)


def frame_rate(target_fps: float = 24.0, fps: float | None = None) -> ClipTimingRule:
    """``min(1, fps / target_fps)``: penalises clips below the target frame rate."""
    return ClipTimingRule("frame_rate", target_fps, 1.0, fps)
