"""Procedural coloured shapes: images, short videos, defects and captions (DESIGN §5).

Every sample is a pure function of its :class:`ShapeSpec`, its integer ``seed`` and its defect options, so
any image or clip can be redrawn exactly. Shapes are drawn with torch on a 4x supersampled grid and
box-filtered down (anti-aliased edges), on a light, unsaturated background: a pixel is "shape" when it is
saturated, which is what the rules in :mod:`mmalign.toy.rewards` rely on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.13, 0.13),
    "green": (0.15, 0.68, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.83, 0.12),
    "purple": (0.60, 0.20, 0.78),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.17, "large": 0.33}  # radius as a fraction of the image side
DEFAULT_SIZE = 0.25
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) centre as fractions of the image side
    "left": (0.32, 0.5),
    "right": (0.68, 0.5),
    "top": (0.5, 0.32),
    "bottom": (0.5, 0.68),
}
BACKGROUND: tuple[float, float, float] = (0.90, 0.90, 0.88)
TOY_WORDS: list[str] = sorted(
    {
        "a",
        "an",
        "photo",
        "of",
        "the",
        "on",
        "at",
        "in",
        "center",
        "moving",
        *COLORS,
        *SHAPES,
        *SIZES,
        *POSITIONS,
    }
)
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """What a caption asks for: one shape of one colour, optionally with a size and a position word."""

    color: str
    shape: str
    size: str | None = None
    position: str | None = None

    def __post_init__(self):
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; toy colours are {sorted(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; toy shapes are {list(SHAPES)}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; toy sizes are {sorted(SIZES)}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; toy positions are {sorted(POSITIONS)}")

    def caption(self) -> str:
        """The English caption, e.g. ``"a small red circle on the left"``."""
        words = ["a", *([self.size] if self.size else []), self.color, self.shape]
        if self.position:
            words += ["on", "the", self.position]
        return " ".join(words)


def parse_caption(caption: str) -> ShapeSpec:
    """Read the colour, shape, size and position words of a toy caption.

    Raises:
        ValueError: if the caption names no toy colour or no toy shape.
    """
    words = caption.lower().replace(",", " ").split()
    color = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in SHAPES), None)
    if color is None or shape is None:
        raise ValueError(
            f"toy caption {caption!r} must name a colour {sorted(COLORS)} and a shape {list(SHAPES)}"
        )
    size = next((w for w in words if w in SIZES), None)
    position = next((w for w in words if w in POSITIONS), None)
    return ShapeSpec(color, shape, size, position)


def sample_spec(seed: int, *, p_size: float = 0.0, p_position: float = 0.0) -> ShapeSpec:
    """A random spec: uniform colour and shape, a size/position word with probability ``p_size``/``p_position``."""
    rng = random.Random(seed)
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    size = rng.choice(sorted(SIZES)) if rng.random() < p_size else None
    position = rng.choice(sorted(POSITIONS)) if rng.random() < p_position else None
    return ShapeSpec(color, shape, size, position)


def all_captions() -> list[str]:
    """The plain ``"a <colour> <shape>"`` captions, colours x shapes, in a fixed order."""
    return [ShapeSpec(c, s).caption() for c in sorted(COLORS) for s in SHAPES]


def _coverage(shape: str, cx: float, cy: float, r: float, size: int) -> torch.Tensor:
    """Anti-aliased coverage [H,W] in [0,1] of one shape (centre/radius as fractions of the side)."""
    n = size * _SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif shape == "square":  # same area as the circle
        half = 0.886 * r
        inside = (dx.abs() <= half) & (dy.abs() <= half)
    else:  # upright equilateral triangle, circumradius 1.3 r, centroid at (cx, cy)
        big_r = 1.3 * r
        inside = (dy <= big_r / 2) & (dy >= -big_r + 1.732 * dx.abs())
    cov = inside.float().reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(dim=(1, 3))
    return cov


def _layout(spec: ShapeSpec, rng: random.Random) -> tuple[float, float, float]:
    """Centre (x, y) and radius of the shape, jittered by ``rng``."""
    r = (SIZES[spec.size] if spec.size else DEFAULT_SIZE) * rng.uniform(0.9, 1.1)
    if spec.position:
        cx, cy = POSITIONS[spec.position]
        cx, cy = cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04)
    else:
        margin = min(0.5, r * 1.3 + 0.03)
        cx, cy = rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)
    return cx, cy, r


def _paint(cov: torch.Tensor, color: tuple[float, float, float], background: torch.Tensor) -> torch.Tensor:
    """Composite a colour over ``background`` [3,H,W] with coverage ``cov`` [H,W]."""
    col = torch.tensor(color).view(3, 1, 1)
    return background * (1 - cov) + col * cov


def _jitter_color(name: str, rng: random.Random) -> tuple[float, float, float]:
    return tuple(min(1.0, max(0.0, v + rng.uniform(-0.04, 0.04))) for v in COLORS[name])  # type: ignore[return-value]


def _wrong_color(name: str, rng: random.Random) -> str:
    return rng.choice([c for c in sorted(COLORS) if c != name])


def add_speckle(image: torch.Tensor, amount: float, seed: int) -> torch.Tensor:
    """Replace a fraction ``amount`` of pixels by random colours (salt-and-pepper style speckle).

    Args:
        image: [..., 3, H, W] float in [0, 1].
        amount: expected fraction of pixels replaced, in [0, 1].
        seed: seed of the speckle pattern.

    Returns:
        A new tensor of the same shape.
    """
    g = torch.Generator().manual_seed(seed)
    mask_shape = (*image.shape[:-3], 1, *image.shape[-2:])
    mask = (torch.rand(mask_shape, generator=g) < amount).float()
    noise = torch.rand(image.shape, generator=g)
    return image * (1 - mask) + noise * mask


def render_image(
    spec: ShapeSpec | str,
    *,
    seed: int,
    size: int = 32,
    speckle: float = 0.0,
    wrong_color: bool = False,
) -> torch.Tensor:
    """Draw one shape.

    Args:
        spec: a :class:`ShapeSpec` or a toy caption.
        seed: layout, colour-jitter and defect seed; the same arguments always give the same pixels.
        size: image side in pixels.
        speckle: fraction of pixels replaced by random colours (0 = clean).
        wrong_color: draw the shape in another colour than the caption says (the caption is unchanged).

    Returns:
        [3, size, size] float in [0, 1].
    """
    spec = parse_caption(spec) if isinstance(spec, str) else spec
    rng = random.Random(seed)
    cx, cy, r = _layout(spec, rng)
    color = _wrong_color(spec.color, rng) if wrong_color else spec.color
    background = torch.tensor(BACKGROUND).view(3, 1, 1).expand(3, size, size)
    image = _paint(_coverage(spec.shape, cx, cy, r, size), _jitter_color(color, rng), background)
    if speckle > 0:
        image = add_speckle(image, speckle, seed + 7919)
    return image.clamp(0, 1)


def render_video(
    spec: ShapeSpec | str,
    *,
    seed: int,
    frames: int = 16,
    size: int = 32,
    speckle: float = 0.0,
    flicker_segment: int | None = None,
    segments: int = 4,
    flicker_amount: float = 0.35,
) -> torch.Tensor:
    """A shape moving in a straight line across ``frames`` frames.

    Args:
        spec: a :class:`ShapeSpec` or a toy caption (its position word, if any, is where the motion is centred).
        seed: path, colour-jitter and defect seed.
        frames: number of frames T.
        size: frame side in pixels.
        speckle: per-frame speckle fraction (each frame gets its own pattern).
        flicker_segment: if set, frames of this segment (``segments`` equal chunks of the clip) alternate
            between brighter and darker by ``flicker_amount``: a temporal flicker defect.
        segments: number of equal segments the clip is split into (only for ``flicker_segment``).
        flicker_amount: relative brightness swing of the flicker.

    Returns:
        [T, 3, size, size] float in [0, 1].
    """
    spec = parse_caption(spec) if isinstance(spec, str) else spec
    rng = random.Random(seed)
    cx, cy, r = _layout(spec, rng)
    color = _jitter_color(spec.color, rng)
    angle = rng.uniform(0, 6.2832)
    travel = rng.uniform(0.15, 0.3)
    dx, dy = travel * torch.cos(torch.tensor(angle)).item(), travel * torch.sin(torch.tensor(angle)).item()
    background = torch.tensor(BACKGROUND).view(3, 1, 1).expand(3, size, size)
    out = []
    for t in range(frames):
        a = t / max(frames - 1, 1) - 0.5
        out.append(_paint(_coverage(spec.shape, cx + a * dx, cy + a * dy, r, size), color, background))
    video = torch.stack(out)
    if speckle > 0:
        video = add_speckle(video, speckle, seed + 7919)
    if flicker_segment is not None:
        if not 0 <= flicker_segment < segments:
            raise ValueError(f"flicker_segment={flicker_segment} must be in [0, {segments})")
        for t in segment_frames(frames, segments)[flicker_segment]:
            video[t] = video[t] * (1 + flicker_amount * (1 if t % 2 == 0 else -1))
    return video.clamp(0, 1)


def segment_frames(frames: int, segments: int) -> list[range]:
    """Split frame indices 0..frames-1 into ``segments`` contiguous, near-equal ranges."""
    if not 1 <= segments <= frames:
        raise ValueError(f"segments={segments} must be between 1 and frames={frames}")
    bounds = [round(i * frames / segments) for i in range(segments + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(segments)]


@dataclass(frozen=True)
class ToySample:
    """One row of a generated data set: the caption, the spec actually drawn, its seed and defects."""

    caption: str
    spec: ShapeSpec
    seed: int
    speckle: float
    wrong_color: bool


def sample_dataset(
    n: int,
    *,
    seed: int,
    size: int = 32,
    p_speckle: float = 0.0,
    speckle_range: tuple[float, float] = (0.03, 0.12),
    p_wrong_color: float = 0.0,
    p_size: float = 0.3,
    p_position: float = 0.3,
) -> tuple[torch.Tensor, list[ToySample]]:
    """Draw ``n`` captioned images, a fraction of them with defects.

    Returns:
        images [n, 3, size, size] in [0, 1] and one :class:`ToySample` per image.
    """
    rng = random.Random(seed)
    images, rows = [], []
    for i in range(n):
        s = seed * 1_000_003 + i
        spec = sample_spec(s, p_size=p_size, p_position=p_position)
        speckle = rng.uniform(*speckle_range) if rng.random() < p_speckle else 0.0
        wrong = rng.random() < p_wrong_color
        images.append(render_image(spec, seed=s, size=size, speckle=speckle, wrong_color=wrong))
        rows.append(ToySample(spec.caption(), spec, s, speckle, wrong))
    return torch.stack(images), rows


def to_pil(image: torch.Tensor):
    """[3,H,W] float in [0,1] -> PIL RGB image."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


def image_grid(images: torch.Tensor, nrow: int = 8, scale: int = 1, pad: int = 1):
    """Tile images [N,3,H,W] (or a video [T,3,H,W]) into one PIL image, ``nrow`` per row, upscaled ``scale``x."""
    n, _, h, w = images.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = torch.ones(3, rows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[
            :, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w
        ] = images[i]
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return to_pil(grid)


__all__ = [
    "BACKGROUND",
    "COLORS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TOY_WORDS",
    "ShapeSpec",
    "ToySample",
    "add_speckle",
    "all_captions",
    "image_grid",
    "parse_caption",
    "render_image",
    "render_video",
    "sample_dataset",
    "sample_spec",
    "segment_frames",
    "to_pil",
]
