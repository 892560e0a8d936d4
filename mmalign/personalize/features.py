"""Frozen image/text features for the user encoders and PAL: any CLIP-family reward of :mod:`mmalign.rewards`.

``features="pickscore"`` (or ``clip_score``, ``hpsv2`` ...) builds that reward with ``features_kwargs`` (e.g.
``{"model": "yuvalkirstain/PickScore_v1"}``) and uses its image tower and preprocessing; a
``"package.module:function"`` path names any factory returning an object with ``images(x) -> [N, D]`` (and
optionally ``texts(prompts) -> [N, E]``), e.g. the toy world's ``mmalign.toy.users:toy_features``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class Features:
    """Frozen feature extractor: ``images`` [N,3,H,W] in [0,1] -> [N,D]; ``texts`` prompts -> [N,E] or None."""

    images: Callable[[torch.Tensor], torch.Tensor]
    texts: Callable[[Sequence[str]], torch.Tensor] | None = None
    name: str = ""


def clip_features(reward: Any, name: str) -> Features:
    """Image/text towers of a :class:`~mmalign.rewards.clip.ClipSimilarityReward`, L2-normalised."""

    @torch.no_grad()
    def images(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(
            reward.encode_image(reward.transform(x.to(reward.device, reward.dtype))).float(), dim=-1
        ).cpu()

    @torch.no_grad()
    def texts(prompts: Sequence[str]) -> torch.Tensor:
        return F.normalize(reward.encode_text(list(prompts)).float(), dim=-1).cpu()

    return Features(images, texts, name)


def get_features(name: str, **kwargs: Any) -> Features:
    """Build a feature extractor from a reward name (CLIP family) or a ``module:function`` factory."""
    from mmalign.rewards import REWARDS, _resolve, get_reward

    if name in REWARDS:
        reward = get_reward(name, **kwargs)
        if not hasattr(reward, "encode_image"):
            raise ValueError(
                f"features={name!r}: this reward has no CLIP image tower; use clip_score, pickscore or hpsv2"
            )
        return clip_features(reward, name)
    if ":" not in name:
        raise ValueError(
            f"features={name!r}: use a CLIP-family reward name (clip_score, pickscore, hpsv2) or 'module:function'"
        )
    out = _resolve(name)(**kwargs)
    if not isinstance(out, Features):
        out = Features(out.images, getattr(out, "texts", None), name)
    out.name = name
    return out
