"""Exact rule rewards for the toy world (DESIGN §4, §5).

Each public function here is a factory: called with its options it returns
``reward(media, prompts) -> Tensor[B]``, where ``media`` is float in [0, 1], images [B,3,H,W] or videos
[B,T,3,H,W] (a video is scored as the mean over its frames unless said otherwise). They are exact
because they know how the toy world is drawn (:mod:`mmalign.toy.render`): the background is light and
unsaturated, a shape is one saturated colour from :data:`~mmalign.toy.render.COLORS`.

Rewards are continuous in [0, 1] (higher is better) so that preference pairs and win rates have
resolution; see DESIGN §5 on why a binary reward cannot show a clear win over a base that is already
right 80% of the time. They are registered through the ``mmalign.rewards`` entry points (pyproject.toml) as ``toy_color``,
``toy_color_correct``, ``toy_defect``, ``toy_shape`` and ``toy_flicker``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mmalign.toy.render import COLORS, parse_caption, segment_frames

Reward = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
_PALETTE_NAMES = sorted(COLORS)


def _frames(media: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Images [B,3,H,W] -> (same, 1); videos [B,T,3,H,W] -> ([B*T,3,H,W], T)."""
    if media.dim() == 4:
        return media, 1
    if media.dim() == 5:
        b, t = media.shape[:2]
        return media.reshape(b * t, *media.shape[2:]), t
    raise ValueError(
        f"toy rewards take images [B,3,H,W] or videos [B,T,3,H,W], got shape {tuple(media.shape)}"
    )


def _check(media: torch.Tensor, prompts: Sequence[str] | None) -> None:
    if prompts is not None and len(prompts) != media.shape[0]:
        raise ValueError(f"got {media.shape[0]} media but {len(prompts)} prompts")


def foreground_weight(images: torch.Tensor, low: float = 0.15, high: float = 0.35) -> torch.Tensor:
    """Soft shape mask [N,H,W] in [0,1] from saturation (max - min over RGB) of images [N,3,H,W]."""
    sat = images.amax(dim=1) - images.amin(dim=1)
    return ((sat - low) / (high - low)).clamp(0, 1)


def _prompt_colors(prompts: Sequence[str], frames_per_item: int, device) -> torch.Tensor:
    cols = torch.tensor([COLORS[parse_caption(p).color] for p in prompts], dtype=torch.float32, device=device)
    return cols.repeat_interleave(frames_per_item, dim=0)


def color_match(sigma: float = 0.2, min_pixels: float = 6.0) -> Reward:
    """Factory: how well the shape's pixels match the prompt's colour, continuous in [0, 1].

    Score = sum_p w_p * exp(-||x_p - c||^2 / (2 sigma^2)) / sum_p w_p, with w the soft saturation mask and
    c the prompt colour, times a presence gate min(1, sum_p w_p / min_pixels) (no shape scores 0).

    Args:
        sigma: colour tolerance in RGB units ([0,1] scale).
        min_pixels: foreground mass below which the score is scaled down.
    """

    def reward(media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _check(media, prompts)
        images, t = _frames(media.float())
        w = foreground_weight(images)
        target = _prompt_colors(prompts, t, images.device).view(-1, 3, 1, 1)
        sim = torch.exp(-((images - target) ** 2).sum(dim=1) / (2 * sigma**2))
        mass = w.sum(dim=(1, 2))
        score = (w * sim).sum(dim=(1, 2)) / mass.clamp_min(1e-6) * (mass / min_pixels).clamp(max=1)
        return score.view(-1, t).mean(dim=1)

    return reward


def mean_color_match(sigma: float = 0.2, min_pixels: float = 6.0) -> Reward:
    """Factory: how close the shape's mean colour is to the prompt's colour, continuous in [0, 1].

    Score = exp(-||m - c||^2 / (2 sigma^2)) with m the saturation-weighted mean colour of the shape, times the
    same presence gate as :func:`color_match`. Unlike the per-pixel score it does not move when a model only
    softens or sharpens the shape's edges, so it tracks the colour the prompt asked for, not edge rendering.
    """

    def reward(media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _check(media, prompts)
        images, t = _frames(media.float())
        w = foreground_weight(images)
        mass = w.sum(dim=(1, 2))
        mean = (images * w[:, None]).sum(dim=(2, 3)) / mass.clamp_min(1e-6)[:, None]
        target = _prompt_colors(prompts, t, images.device)
        score = torch.exp(-((mean - target) ** 2).sum(dim=1) / (2 * sigma**2)) * (mass / min_pixels).clamp(
            max=1
        )
        return score.view(-1, t).mean(dim=1)

    return reward


def dominant_color(images: torch.Tensor) -> list[str | None]:
    """Name of the palette colour nearest to each image's mean shape colour (None if no shape); images [N,3,H,W]."""
    w = foreground_weight(images)
    mass = w.sum(dim=(1, 2))
    mean = (images * w[:, None]).sum(dim=(2, 3)) / mass.clamp_min(1e-6)[:, None]
    palette = torch.tensor([COLORS[c] for c in _PALETTE_NAMES], device=images.device)
    nearest = torch.cdist(mean, palette).argmin(dim=1)
    return [_PALETTE_NAMES[i] if m >= 2.0 else None for i, m in zip(nearest.tolist(), mass.tolist())]


def color_correct() -> Reward:
    """Factory: 1 if the shape's mean colour is nearest to the prompt's colour, else 0 (binary; for reports)."""

    def reward(media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _check(media, prompts)
        images, t = _frames(media.float())
        names = dominant_color(images)
        want = [parse_caption(p).color for p in prompts for _ in range(t)]
        hits = torch.tensor([float(a == b) for a, b in zip(names, want)], device=images.device)
        return hits.view(-1, t).mean(dim=1)

    return reward


def _median3x3(images: torch.Tensor) -> torch.Tensor:
    n, c, h, w = images.shape
    patches = F.unfold(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel_size=3)  # [N, C*9, H*W]
    return patches.view(n, c, 9, h * w).median(dim=2).values.view(n, c, h, w)


def speckle_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute residual to a 3x3 median filter, [N] for images [N,3,H,W].

    Isolated pixels (speckle) leave a large residual; flat regions and straight shape edges leave almost none.
    """
    return (images - _median3x3(images)).abs().mean(dim=(1, 2, 3))


def defect_energy(scale: float = 0.01) -> Reward:
    """Factory: cleanliness exp(-speckle_energy / scale) in (0, 1]; higher = fewer speckle/high-frequency defects.

    Prompts are accepted for the common protocol and ignored. A clean rendered shape scores about 0.9, 5%
    speckle about 0.2.

    Args:
        scale: energy at which the reward falls to 1/e.
    """

    def reward(media: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        _check(media, prompts)
        images, t = _frames(media.float())
        return torch.exp(-speckle_energy(images) / scale).view(-1, t).mean(dim=1)

    return reward


SHAPE_FILL: dict[str, float] = {
    "circle": 0.79,
    "square": 1.0,
    "triangle": 0.55,
}  # measured on rendered 32 px shapes


def shape_fill(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Shape area / bounding-box area, [N], for images [N,3,H,W] (square ~1, circle ~0.79, triangle ~0.55)."""
    w = foreground_weight(images)
    out = []
    for mask, soft in zip(w > threshold, w):
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        if len(rows) == 0:
            out.append(0.0)
            continue
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        out.append(soft.sum().item() / box.item())
    return torch.tensor(out, device=images.device)


def shape_match(sigma: float = 0.08) -> Reward:
    """Factory: does the shape have the prompt's shape? exp(-(fill - fill_target)^2 / (2 sigma^2)) in [0, 1].

    Uses how much of its bounding box the shape fills (:func:`shape_fill`); independent of colour, so it
    shows reward hacking when tuning on colour.
    """

    def reward(media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _check(media, prompts)
        images, t = _frames(media.float())
        target = torch.tensor(
            [SHAPE_FILL[parse_caption(p).shape] for p in prompts for _ in range(t)], device=images.device
        )
        return torch.exp(-((shape_fill(images) - target) ** 2) / (2 * sigma**2)).view(-1, t).mean(dim=1)

    return reward


def flicker_segment_energy(videos: torch.Tensor, segments: int) -> torch.Tensor:
    """Temporal flicker energy per segment, [B,S], for videos [B,T,3,H,W].

    Per frame, the mean brightness m_t is compared with the mean of its neighbours,
    |m_t - (m_{t-1} + m_{t+1}) / 2| (ends replicate): steady motion gives ~0, alternating brightness a lot.
    A segment's energy is the mean over its frames (:func:`~mmalign.toy.render.segment_frames`).
    """
    if videos.dim() != 5:
        raise ValueError(f"flicker needs videos [B,T,3,H,W], got shape {tuple(videos.shape)}")
    m = videos.float().mean(dim=(2, 3, 4))  # [B,T]
    padded = torch.cat([m[:, :1], m, m[:, -1:]], dim=1)
    per_frame = (m - 0.5 * (padded[:, :-2] + padded[:, 2:])).abs()
    return torch.stack(
        [per_frame[:, list(r)].mean(dim=1) for r in segment_frames(m.shape[1], segments)], dim=1
    )


def flicker(segments: int = 4, scale: float = 0.01, per_segment: bool = False, reduce: str = "min") -> Reward:
    """Factory: video steadiness, exp(-flicker energy / scale) in (0, 1]; higher = less flicker.

    Args:
        segments: number of equal segments the clip is split into.
        scale: energy at which a segment's score falls to 1/e.
        per_segment: return the per-segment scores [B,S] instead of the clip score [B].
        reduce: how segment scores make the clip score: ``"min"`` (the worst segment) or ``"mean"``.
    """
    if reduce not in ("min", "mean"):
        raise ValueError(f"reduce={reduce!r}; use 'min' or 'mean'")

    def reward(media: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        _check(media, prompts)
        scores = torch.exp(-flicker_segment_energy(media, segments) / scale)
        if per_segment:
            return scores
        return scores.amin(dim=1) if reduce == "min" else scores.mean(dim=1)

    return reward


__all__ = [
    "SHAPE_FILL",
    "color_correct",
    "color_match",
    "defect_energy",
    "dominant_color",
    "flicker",
    "flicker_segment_energy",
    "foreground_weight",
    "shape_fill",
    "shape_match",
    "speckle_energy",
]
