"""Hybrid and ensemble rewards over normalised members (DESIGN §4, reference/rewards_peers.md §1.5-1.6).

Reward scales differ by ~100x (PickScore ~20, HPS ~0.3, aesthetic ~6), so every member is normalised
before it is combined:

- ``zscore``: ``(x - mean) / std`` over the batch (population std; 0 when the batch is constant).
- ``running_zscore``: the same with mean/variance accumulated over every batch seen (Welford).
- ``rank``: average rank scaled to [0, 1] (ties share their mean rank; 0.5 for a batch of one).
- ``minmax``: ``(x - min) / (max - min)`` over the batch (0.5 when constant).
- ``affine``: fixed ``scale * x + shift`` (e.g. PickScore / 26 as flow_grpo).
- ``none``: identity.

Hybrid: ``total = sum_i w_i * g_i * norm_i(raw_i)`` where ``g_i`` is 1, or the member's confidence in
[0, 1] (soft gate), or ``confidence >= gate`` (hard gate). Ensemble: ``mean | median | min | mean - lam*std``
over normalised members; ``disagreement`` is their std (population), a reward-hacking alarm.

Both keep every member's raw and normalised scores: ``components(media, prompts)`` returns
``{"<name>/raw", "<name>/norm", ["<name>/confidence"], "total", ["disagreement"]}``. Normalisers work over
all elements of a member's output, so per-segment members [B,S] are normalised over B*S values and [B]
members broadcast against them.

Batch invariance. A normaliser's statistics must not depend on how media were batched, so scoring is split in
two: ``raw(media, prompts)`` runs the members on a batch (no normalisation), and ``combine(raw, groups)``
normalises the raw scores of the *whole scored set* at once, either over all of it (``normalize_over: set``) or
within each prompt group (``normalize_over: prompt``, what ``score`` and ``label`` use unless the reward config
says otherwise: candidates of one prompt are what labelling compares). ``mmalign score`` collects the raw scores of every batch and combines once at the end, so batch
sizes 1, 5 and 16 give identical scores. ``components(media, prompts)`` is ``combine(raw(...))`` over the media
it is given (one call over everything, as ``mmalign eval`` does, is batch-invariant too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Normalizer = Callable[[torch.Tensor], torch.Tensor]
EPS = 1e-8


def _spread_tol(x: torch.Tensor) -> torch.Tensor:
    """Spread below this is float rounding, not signal (relative to the values' magnitude)."""
    return 1e-6 * x.detach().abs().max() + 1e-12


def zscore(x: torch.Tensor) -> torch.Tensor:
    """Batch z-score over all elements; zeros when there is no spread (beyond float rounding)."""
    std = x.std(unbiased=False) if x.numel() > 1 else x.new_zeros(())
    ok = std > _spread_tol(x)
    return torch.where(ok, (x - x.mean()) / std.clamp_min(EPS), torch.zeros_like(x))


def minmax(x: torch.Tensor) -> torch.Tensor:
    """``(x - min) / (max - min)``; 0.5 everywhere when constant (beyond float rounding)."""
    lo, hi = x.min(), x.max()
    ok = hi - lo > _spread_tol(x)
    return torch.where(ok, (x - lo) / (hi - lo).clamp_min(EPS), torch.full_like(x, 0.5))


def rank(x: torch.Tensor) -> torch.Tensor:
    """Average rank in [0, 1] (ties share their mean rank); 0.5 for one element."""
    flat = x.flatten()
    n = flat.numel()
    if n == 1:
        return torch.full_like(x, 0.5)
    less = (flat.unsqueeze(0) < flat.unsqueeze(1)).sum(1).float()
    equal = (flat.unsqueeze(0) == flat.unsqueeze(1)).sum(1).float()
    avg_rank = less + (equal - 1) / 2  # 0-based average rank
    return (avg_rank / (n - 1)).view_as(x).to(x.dtype)


def identity(x: torch.Tensor) -> torch.Tensor:
    """No normalisation."""
    return x


@dataclass
class Affine:
    """Fixed ``scale * x + shift``."""

    scale: float = 1.0
    shift: float = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


@dataclass
class RunningZScore:
    """z-score with mean/variance over every value seen so far (Welford/Chan merge), updated then applied.

    Attributes:
        count: Values seen.
        mean: Running mean.
        m2: Running sum of squared deviations.
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        values = x.detach().double().flatten()
        n_b = values.numel()
        mean_b = float(values.mean())
        m2_b = float(((values - mean_b) ** 2).sum())
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * self.count * n_b / n
        self.count = n
        std = (self.m2 / n) ** 0.5
        if std <= EPS:
            return torch.zeros_like(x)
        return (x - self.mean) / std


def make_normalizer(spec: str | Mapping[str, Any] | Normalizer | None) -> Normalizer:
    """Build a normaliser from ``"zscore"``, ``"running_zscore"``, ``"rank"``, ``"minmax"``, ``"none"``,
    ``{"name": "affine", "scale": s, "shift": b}`` or a callable."""
    if spec is None:
        return identity
    if callable(spec):
        return spec
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        if name != "affine":
            raise ValueError(f"normalizer mapping {dict(spec)} must have name: affine (with scale, shift)")
        return Affine(float(kwargs.pop("scale", 1.0)), float(kwargs.pop("shift", 0.0)))
    table: dict[str, Callable[[], Normalizer]] = {
        "zscore": lambda: zscore,
        "running_zscore": RunningZScore,
        "rank": lambda: rank,
        "minmax": lambda: minmax,
        "none": lambda: identity,
        "affine": Affine,
    }
    if spec not in table:
        raise ValueError(
            f"unknown normalizer {spec!r}; use one of {sorted(table)} or {{name: affine, scale, shift}}"
        )
    return table[spec]()


def _call(
    reward: Callable[..., torch.Tensor], media: torch.Tensor, prompts: Sequence[str], fps: float | None
):
    if fps is not None and getattr(reward, "accepts_fps", False):
        return reward(media, prompts, fps=fps)
    return reward(media, prompts)


NORMALIZE_OVER = ("prompt", "set")


def normalize_groups(normalizer: Normalizer, x: torch.Tensor, groups: Sequence[Any] | None) -> torch.Tensor:
    """``normalizer`` applied over all of ``x`` [N(,S)] (``groups`` None) or separately within each group.

    Args:
        normalizer: A normaliser (statistics over the values it is given).
        x: Raw scores, first dim = items.
        groups: One hashable key per item (e.g. the prompt), or None for one group.
    """
    if groups is None:
        return normalizer(x)
    if len(groups) != x.shape[0]:
        raise ValueError(f"{len(groups)} group keys for {x.shape[0]} scores")
    out = torch.empty_like(x)
    index: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    for idx in index.values():
        sel = torch.tensor(idx, device=x.device)
        out[sel] = normalizer(x[sel])
    return out


def _check_over(normalize_over: str | None) -> None:
    if normalize_over is not None and normalize_over not in NORMALIZE_OVER:
        raise ValueError(f"normalize_over={normalize_over!r}: use one of {NORMALIZE_OVER}")


def _align(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Broadcast [B] members against [B,S] members."""
    if all(v.ndim == 1 for v in values):
        return values
    return [v.unsqueeze(1) if v.ndim == 1 else v for v in values]


@dataclass
class HybridComponent:
    """One member of a hybrid.

    Attributes:
        name: Label in the output (``<name>/raw`` ...).
        reward: The reward callable.
        weight: Weight in the sum.
        normalizer: Normaliser of the raw score.
        confidence: ``(media, prompts) -> [B]`` in [0, 1], or None (defaults to ``reward.confidence`` when
            ``use_confidence`` is set).
        gate: Hard gate threshold on the confidence (None: multiply by the confidence).
        use_confidence: Read ``reward.confidence`` when no explicit confidence is given.
    """

    name: str
    reward: Callable[..., torch.Tensor]
    weight: float = 1.0
    normalizer: Normalizer = zscore
    confidence: Callable[..., torch.Tensor] | None = None
    gate: float | None = None
    use_confidence: bool = True

    def confidence_fn(self) -> Callable[..., torch.Tensor] | None:
        if self.confidence is not None:
            return self.confidence
        return getattr(self.reward, "confidence", None) if self.use_confidence else None


@dataclass
class HybridReward:
    """Weighted sum of normalised, optionally confidence-gated components (see module docstring).

    Attributes:
        members: The components.
        normalize_over: ``prompt`` (normalise within each prompt group), ``set`` (over everything scored) or None
            (unset: :meth:`components` normalises over the media it is given; ``mmalign score`` and ``label``
            use ``prompt``).
    """

    members: list[HybridComponent] = field(default_factory=list)
    normalize_over: str | None = None
    accepts_fps: bool = True

    def __post_init__(self) -> None:
        _check_over(self.normalize_over)

    def raw(
        self, media: torch.Tensor, prompts: Sequence[str], fps: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Members' raw scores ``<name>/raw`` (and ``<name>/confidence``) on a batch; nothing normalised."""
        out: dict[str, torch.Tensor] = {}
        for m in self.members:
            out[f"{m.name}/raw"] = _call(m.reward, media, prompts, fps).float()
            conf_fn = m.confidence_fn()
            if conf_fn is not None:
                out[f"{m.name}/confidence"] = conf_fn(media, prompts).float()
        return out

    def combine(
        self, raw: Mapping[str, torch.Tensor], groups: Sequence[Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """Normalise raw scores of a whole set (per group when given) and sum: ``<name>/norm`` and ``total``.

        Args:
            raw: From :meth:`raw`, concatenated over every batch of the set ([N] or [N,S] each).
            groups: Group key per item (``normalize_over: prompt``), or None to normalise over the whole set.
        """
        out: dict[str, torch.Tensor] = dict(raw)
        terms = []
        for m in self.members:
            norm = normalize_groups(m.normalizer, raw[f"{m.name}/raw"].float(), groups)
            out[f"{m.name}/norm"] = norm
            gate = torch.ones_like(norm)
            conf = raw.get(f"{m.name}/confidence")
            if conf is not None:
                conf = conf.float().to(norm.device).view(-1, *([1] * (norm.ndim - 1)))
                gate = (
                    (conf >= m.gate).float().expand_as(norm) if m.gate is not None else conf.expand_as(norm)
                )
            terms.append(m.weight * gate * norm)
        out["total"] = torch.stack(torch.broadcast_tensors(*_align(terms))).sum(0)
        return out

    def components(
        self, media: torch.Tensor, prompts: Sequence[str], fps: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Every member's raw, normalised (and confidence) scores plus ``total`` over these media; each [B] (or [B,S])."""
        groups = list(prompts) if self.normalize_over == "prompt" else None
        return self.combine(self.raw(media, prompts, fps), groups)

    def __call__(self, media: torch.Tensor, prompts: Sequence[str], fps: float | None = None) -> torch.Tensor:
        """Args: media [B,...] in [0, 1]; prompts B strings. Returns [B] (or [B,S]) totals."""
        return self.components(media, prompts, fps)["total"]


AGGREGATES = ("mean", "median", "min", "mean_minus_std")


@dataclass
class EnsembleReward:
    """Aggregate of normalised members: mean | median | min | mean - lam * std; reports disagreement.

    Attributes:
        members: (name, reward, normaliser) triples.
        aggregate: One of ``mean``, ``median``, ``min``, ``mean_minus_std``.
        lam: lambda of ``mean_minus_std``.
        normalize_over: ``prompt`` (normalise within each prompt group), ``set`` (over everything scored) or None
            (unset: :meth:`components` normalises over the media it is given; ``mmalign score`` and ``label``
            use ``prompt``).
    """

    members: list[tuple[str, Callable[..., torch.Tensor], Normalizer]] = field(default_factory=list)
    aggregate: str = "mean"
    lam: float = 1.0
    normalize_over: str | None = None
    accepts_fps: bool = True

    def __post_init__(self) -> None:
        _check_over(self.normalize_over)
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate={self.aggregate!r}: use one of {AGGREGATES}")
        if not self.members:
            raise ValueError("an ensemble needs at least one member")

    def raw(
        self, media: torch.Tensor, prompts: Sequence[str], fps: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Members' raw scores ``<name>/raw`` on a batch; nothing normalised."""
        return {f"{name}/raw": _call(reward, media, prompts, fps).float() for name, reward, _ in self.members}

    def combine(
        self, raw: Mapping[str, torch.Tensor], groups: Sequence[Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """Normalise a whole set's raw scores (per group when given), aggregate: ``disagreement`` and ``total``."""
        out: dict[str, torch.Tensor] = dict(raw)
        norms = []
        for name, _, normalizer in self.members:
            out[f"{name}/norm"] = norm = normalize_groups(normalizer, raw[f"{name}/raw"].float(), groups)
            norms.append(norm)
        stacked = torch.stack(torch.broadcast_tensors(*_align(norms)))  # [M, B(, S)]
        std = stacked.std(0, unbiased=False)
        if self.aggregate == "mean":
            total = stacked.mean(0)
        elif self.aggregate == "median":
            total = stacked.median(0).values if len(norms) % 2 else stacked.quantile(0.5, dim=0)
        elif self.aggregate == "min":
            total = stacked.min(0).values
        else:
            total = stacked.mean(0) - self.lam * std
        out["disagreement"], out["total"] = std, total
        return out

    def components(
        self, media: torch.Tensor, prompts: Sequence[str], fps: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Members' raw and normalised scores, ``disagreement`` (std over members) and ``total`` over these media."""
        groups = list(prompts) if self.normalize_over == "prompt" else None
        return self.combine(self.raw(media, prompts, fps), groups)

    def __call__(self, media: torch.Tensor, prompts: Sequence[str], fps: float | None = None) -> torch.Tensor:
        """Returns [B] (or [B,S]) aggregated scores."""
        return self.components(media, prompts, fps)["total"]


def _member_name(spec: Mapping[str, Any], seen: dict[str, int]) -> str:
    base = str(spec.get("label") or spec["name"])
    seen[base] = seen.get(base, 0) + 1
    return base if seen[base] == 1 else f"{base}#{seen[base]}"


_MEMBER_KEYS = {"name", "weight", "kwargs", "normalizer", "gate", "confidence", "label"}


def _check_member(spec: Mapping[str, Any] | str) -> dict[str, Any]:
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    unknown = set(spec) - _MEMBER_KEYS
    if unknown or "name" not in spec:
        raise ValueError(
            f"member {spec}: needs 'name'; valid keys {sorted(_MEMBER_KEYS)}, unknown {sorted(unknown)}"
        )
    return spec


def hybrid(
    members: Sequence[Mapping[str, Any] | str],
    normalizer: str | Mapping[str, Any] = "zscore",
    normalize_over: str | None = None,
) -> HybridReward:
    """Weighted sum of normalised rewards; a rule member may gate itself by its confidence.

    Args:
        members: Specs ``{name, weight=1, kwargs={}, normalizer=<default>, gate=None, confidence=true,
            label=name}``: ``gate`` is a hard threshold on the member's confidence (``reward.confidence``),
            ``confidence: false`` ignores it.
        normalizer: Default normaliser for members without one.
        normalize_over: ``prompt`` (within each prompt's candidates; what ``score``/``label`` use when unset) or
            ``set`` (the whole scored set).
    """
    from mmalign.rewards import get_reward

    seen: dict[str, int] = {}
    comps = []
    for raw_spec in members:
        spec = _check_member(raw_spec)
        comps.append(
            HybridComponent(
                name=_member_name(spec, seen),
                reward=get_reward(spec["name"], **(spec.get("kwargs") or {})),
                weight=float(spec.get("weight", 1.0)),
                normalizer=make_normalizer(spec.get("normalizer", normalizer)),
                gate=spec.get("gate"),
                use_confidence=bool(spec.get("confidence", True)),
            )
        )
    return HybridReward(comps, normalize_over)


def ensemble(
    members: Sequence[Mapping[str, Any] | str],
    aggregate: str = "mean",
    lam: float = 1.0,
    normalizer: str | Mapping[str, Any] = "zscore",
    normalize_over: str | None = None,
) -> EnsembleReward:
    """Aggregate normalised rewards by mean | median | min | mean_minus_std and report their disagreement.

    Args:
        members: Specs ``{name, kwargs={}, normalizer=<default>, label=name}``.
        aggregate: ``mean``, ``median``, ``min`` or ``mean_minus_std``.
        lam: lambda of ``mean_minus_std``.
        normalizer: Default normaliser (members must be normalised: raw scales differ ~100x).
        normalize_over: ``prompt`` (within each prompt's candidates; what ``score``/``label`` use when unset) or
            ``set`` (the whole scored set).
    """
    from mmalign.rewards import get_reward

    seen: dict[str, int] = {}
    built = []
    for raw_spec in members:
        spec = _check_member(raw_spec)
        built.append(
            (
                _member_name(spec, seen),
                get_reward(spec["name"], **(spec.get("kwargs") or {})),
                make_normalizer(spec.get("normalizer", normalizer)),
            )
        )
    return EnsembleReward(built, aggregate, lam, normalize_over)
