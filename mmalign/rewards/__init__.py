"""Rewards for generated media (DESIGN §4): one protocol, one plain registry, specs for configs.

A reward is any callable ``reward(media, prompts) -> Tensor[B]`` with media float in [0, 1], images
[B,3,H,W] or videos [B,T,3,H,W]; a video reward may return per-segment scores [B,S] instead. Rewards that
combine others (hybrid, ensemble) also expose ``components(media, prompts) -> dict[str, Tensor]`` with the
raw and normalised score of every member.

``REWARDS`` maps a name to a factory, written as a ``"module:function"`` string so heavy imports stay lazy
(a callable works too). Other packages add rewards through the ``mmalign.rewards`` entry-point group (the toy
world registers its rule rewards this way, so the library never imports it). ``get_reward`` also takes any
``package.module:function`` path::

    reward = get_reward("pickscore", device="cuda")
    reward = get_reward("my_pkg.rewards:make_reward", threshold=0.3)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from mmalign.utils import load_object


@runtime_checkable
class Reward(Protocol):
    """``reward(media, prompts) -> Tensor[B]`` (or [B,S] per-segment for a video reward)."""

    def __call__(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


REWARDS: dict[str, str | Callable[..., Reward]] = {
    # model rewards (mmalign/rewards/clip.py)
    "clip_score": "mmalign.rewards.clip:clip_score",
    "pickscore": "mmalign.rewards.clip:pickscore",
    "hpsv2": "mmalign.rewards.clip:hpsv2",
    "hpsv2.1": "mmalign.rewards.clip:hpsv21",
    "aesthetic": "mmalign.rewards.clip:aesthetic",
    # VLM judge (mmalign/rewards/judge.py)
    "vlm_judge": "mmalign.rewards.judge:vlm_judge",
    # image rules (mmalign/rewards/rules.py)
    "brightness": "mmalign.rewards.rules:brightness",
    "saturation": "mmalign.rewards.rules:saturation",
    "contrast": "mmalign.rewards.rules:contrast",
    "sharpness": "mmalign.rewards.rules:sharpness",
    "colorfulness": "mmalign.rewards.rules:colorfulness",
    "color_match": "mmalign.rewards.rules:color_match",
    "jpeg_size": "mmalign.rewards.rules:jpeg_size",
    "jpeg_compressibility": "mmalign.rewards.rules:jpeg_compressibility",
    "resolution": "mmalign.rewards.rules:resolution",
    "aspect_ratio": "mmalign.rewards.rules:aspect_ratio",
    # video rules
    "duration": "mmalign.rewards.rules:duration",
    "frame_rate": "mmalign.rewards.rules:frame_rate",
    "flicker": "mmalign.rewards.rules:flicker",
    "motion": "mmalign.rewards.rules:motion",
    # combinations (mmalign/rewards/combine.py)
    "hybrid": "mmalign.rewards.combine:hybrid",
    "ensemble": "mmalign.rewards.combine:ensemble",
}
ENTRY_POINT_GROUP = "mmalign.rewards"


@functools.cache
def plugin_rewards() -> dict[str, str]:
    """Rewards other installed packages register in the ``mmalign.rewards`` entry-point group (name -> path)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in REWARDS}


def all_rewards() -> dict[str, str | Callable[..., Reward]]:
    """The built-in registry plus the installed plugins' rewards."""
    return {**plugin_rewards(), **REWARDS}


def _resolve(target: str | Callable[..., Any]) -> Callable[..., Any]:
    return target if callable(target) else load_object(target)


def get_reward(name: str, **kwargs: Any) -> Reward:
    """Build a reward by registry name or ``package.module:function`` path.

    Args:
        name: A key of :data:`REWARDS` or a dotted factory path.
        **kwargs: Passed to the factory.

    Returns:
        The reward callable.

    Raises:
        KeyError: Unknown name; the message lists the registered ones.
    """
    registry = all_rewards()
    if name in registry:
        return _resolve(registry[name])(**kwargs)
    if ":" in name:
        return _resolve(name)(**kwargs)
    import difflib

    close = difflib.get_close_matches(name, registry, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise KeyError(
        f"unknown reward {name!r}.{hint} Registered: {', '.join(sorted(registry))}; "
        "or pass a 'package.module:function' path."
    )


def list_rewards() -> list[str]:
    """Registered reward names, sorted (``mmalign ls``); :func:`describe_rewards` adds descriptions."""
    return sorted(all_rewards())


def describe_rewards() -> list[tuple[str, str]]:
    """(name, one-line description) for every registered reward.

    Descriptions come from the factory docstring's first paragraph; factory modules are imported to read them
    (their heavy dependencies are not).
    """
    rows = []
    registry = all_rewards()
    for name in sorted(registry):
        try:
            doc = (_resolve(registry[name]).__doc__ or "").strip()
            desc = " ".join(doc.split("\n\n")[0].split())  # the summary, even when it wraps
        except (ValueError, ImportError) as e:  # a plugin whose module is missing still gets listed
            desc = f"(unavailable: {e})"
        rows.append((name, desc))
    return rows


@dataclass
class RewardSpec:
    """A reward as written in a config: ``{name: pickscore, weight: 1.0, kwargs: {device: cuda}}``.

    Attributes:
        name: Registry name or ``package.module:function`` path.
        weight: Weight in a hybrid (ignored by a single reward or an ensemble).
        kwargs: Factory keyword arguments.
    """

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(
                f"RewardSpec.name must be a registry name or 'module:function', got {self.name!r}"
            )
        if not isinstance(self.kwargs, dict):
            raise ValueError(
                f"RewardSpec.kwargs for {self.name!r} must be a mapping, got {type(self.kwargs).__name__}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str) -> RewardSpec:
        """Parse a spec from a config mapping (or a bare name); unknown keys fail with the valid ones."""
        if isinstance(data, str):
            return cls(name=data)
        unknown = set(data) - {"name", "weight", "kwargs"}
        if unknown:
            raise ValueError(f"unknown reward spec key(s) {sorted(unknown)}; valid: name, weight, kwargs")
        if "name" not in data:
            raise ValueError(f"reward spec {dict(data)} has no 'name'")
        return cls(
            name=data["name"], weight=float(data.get("weight", 1.0)), kwargs=dict(data.get("kwargs") or {})
        )

    def build(self) -> Reward:
        """Instantiate the reward (``get_reward(name, **kwargs)``)."""
        return get_reward(self.name, **self.kwargs)


__all__ = ["REWARDS", "all_rewards", "Reward", "RewardSpec", "describe_rewards", "get_reward", "list_rewards"]
