"""Toy users with conflicting hidden preferences, along the axes the toy base's own samples vary on.

Measured first (docs/personalization.md, ``python bench/efficacy_personal.py --measure``): over 120 base samples
(every plain caption x 8 seeds, DDIM 20 steps, CFG 2), within one prompt the shape's horizontal centre varies
with std 0.066 of the image side, its vertical centre 0.096, its area 0.025 (of 0.19 on average) and the
brightness of its colour 0.047. Position varies most, then size; so each toy user has a hidden reward

    r_u(x) = w_x * z(cx) + w_y * z(cy) + w_s * z(area)      (z = standardised by the base's spread)

with random signs (some users prefer the left, others the right; the top or the bottom; big or small) and
magnitudes |w_x|, |w_y| ~ U(0.5, 1), w_s ~ U(-0.5, 0.5). An image without a shape scores -10. Users label a
pair by their own reward (ties under a margin dropped), so pooling all users' pairs averages opposite
preferences away: the point of personalising.

``toy_features`` is the toy world's frozen image descriptor for the user encoders and PAL (8x8 RGB and 8x8
saturation maps, 256 numbers): an untrained, generic stand-in for a CLIP image tower, which we cannot download.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmalign.toy.rewards import foreground_weight

# mean and within-prompt std of each attribute over base samples (measured, see the module docstring)
BASE_STATS: dict[str, tuple[float, float]] = {
    "cx": (0.524, 0.066),
    "cy": (0.508, 0.096),
    "area": (0.190, 0.025),
    "brightness": (0.518, 0.047),
}
AXES = ("cx", "cy", "area")


def attributes(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Shape attributes of images [N,3,H,W] in [0,1]: centre ``cx``/``cy`` and ``area`` as fractions of the side,
    ``brightness`` (mean of the shape's RGB) and ``mass`` (foreground pixels)."""
    w = foreground_weight(images.float())
    n, h, wd = w.shape
    mass = w.sum((1, 2))
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(wd, dtype=torch.float32) + 0.5) / wd
    denom = mass.clamp_min(1e-6)
    mean_rgb = (images.float() * w[:, None]).sum((2, 3)) / denom[:, None]
    return {
        "cx": (w * xs[None, None, :]).sum((1, 2)) / denom,
        "cy": (w * ys[None, :, None]).sum((1, 2)) / denom,
        "area": mass / (h * wd),
        "brightness": mean_rgb.mean(1),
        "mass": mass,
    }


@dataclass(frozen=True)
class ToyUser:
    """A toy user: an id and the weights of their hidden reward over :data:`AXES`."""

    id: str
    weights: tuple[float, float, float]

    def reward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Hidden reward [N] of images [N,3,H,W] (prompts accepted for the reward protocol, unused)."""
        a = attributes(images)
        score = sum(w * (a[k] - BASE_STATS[k][0]) / BASE_STATS[k][1] for w, k in zip(self.weights, AXES))
        return torch.where(a["mass"] >= 6.0, score, torch.full_like(score, -10.0))

    def describe(self) -> str:
        wx, wy, ws = self.weights
        return (
            f"{'right' if wx > 0 else 'left'} {abs(wx):.2f}, {'bottom' if wy > 0 else 'top'} {abs(wy):.2f}, "
            f"{'big' if ws > 0 else 'small'} {abs(ws):.2f}"
        )


def population(
    n_train: int = 48, n_unseen: int = 16, *, seed: int = 0
) -> tuple[list[ToyUser], list[ToyUser]]:
    """Training and unseen toy users (disjoint ids ``t00..``, ``u00..``); every sign combination equally often."""
    rng = random.Random(seed)

    def make(prefix: str, n: int) -> list[ToyUser]:
        users = []
        for i in range(n):
            sx, sy = (1 if (i % 4) in (0, 1) else -1), (1 if (i % 4) in (0, 2) else -1)
            w = (sx * rng.uniform(0.5, 1.0), sy * rng.uniform(0.5, 1.0), rng.uniform(-0.5, 0.5))
            users.append(ToyUser(f"{prefix}{i:02d}", w))
        return users

    return make("t", n_train), make("u", n_unseen)


def label_pairs(
    user: ToyUser,
    candidates: torch.Tensor,
    prompts: Sequence[str],
    groups: Sequence[Sequence[int]],
    *,
    margin: float = 0.3,
    max_pairs_per_group: int = 2,
    rng: random.Random | None = None,
) -> list[tuple[int, int, str]]:
    """A user's preference pairs among each group of candidates (same prompt): (chosen index, rejected index, prompt).

    Per group: the best against the worst, then random other pairs above ``margin``, at most ``max_pairs_per_group``.
    """
    rng = rng or random.Random(0)
    scores = user.reward(candidates)
    out = []
    for idx in groups:
        idx = list(idx)
        ranked = sorted(idx, key=lambda i: float(scores[i]), reverse=True)
        options = [
            (a, b) for ai, a in enumerate(ranked) for b in ranked[ai + 1 :] if scores[a] - scores[b] > margin
        ]
        if not options:
            continue
        chosen = [(ranked[0], ranked[-1])] if (ranked[0], ranked[-1]) in options else []
        rest = [p for p in options if p not in chosen]
        rng.shuffle(rest)
        for a, b in (chosen + rest)[:max_pairs_per_group]:
            out.append((a, b, prompts[a]))
    return out


class ToyFeatures:
    """Frozen toy image descriptor: 8x8 area-averaged RGB and saturation maps, flattened (256 numbers)."""

    texts = None

    def images(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-1] != 32 or x.shape[-2] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        sat = foreground_weight(x)[:, None]
        return torch.cat(
            [F.adaptive_avg_pool2d(x, 8).flatten(1), F.adaptive_avg_pool2d(sat, 8).flatten(1)], dim=1
        )


def toy_features() -> ToyFeatures:
    """Factory for ``features="mmalign.toy.users:toy_features"``."""
    return ToyFeatures()
