"""User encoders: a user's few shots (prompt, preferred, dispreferred) -> one vector, cached per user.

Every encoder satisfies :class:`UserEncoder` and is listed in ``ENCODERS`` (name -> ``"module:factory"``):

- ``mean_diff``: mean over the shots of f(preferred) - f(dispreferred) for frozen CLIP-family image features
  f, L2-normalised; the cheap baseline;
- ``pal``: a PAL-B head (:mod:`mmalign.personalize.pal`) trained on seen users; a new user's K mixture
  weights are fitted on the shots (20 epochs, lr 5e-3); the vector is the user's ideal point;
- ``vlm``: PPD's encoder (:mod:`mmalign.personalize.vlm`): a VLM reads the shots, writes a profile, and the
  hidden state of its last generated token is the vector (the profile text is kept).

:func:`embed_users` caches each result in ``<cache_dir>/<key>.safetensors`` keyed by the user id, the exact shots
(a hash of their prompts and decoded pixels) and the encoder's fingerprint: a second run never calls the encoder.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F


@dataclass
class Shot:
    """One of a user's choices. Images are [3,H,W] float in [0,1]; ``where`` names its source (file:row)."""

    prompt: str
    preferred: torch.Tensor
    dispreferred: torch.Tensor
    where: str = ""


@dataclass
class UserEmbedding:
    """An encoder's output for one group of shots: the vector [D] and, for the VLM, the profile it wrote."""

    vector: torch.Tensor
    profile: str = ""


@runtime_checkable
class UserEncoder(Protocol):
    """Maps a user's shots to one vector. ``fingerprint`` identifies everything the output depends on."""

    name: str

    def fingerprint(self) -> dict[str, Any]: ...

    def encode(self, shots: Sequence[Shot]) -> UserEmbedding: ...


ENCODERS: dict[str, str] = {
    "mean_diff": "mmalign.personalize.encoders:mean_diff",
    "pal": "mmalign.personalize.pal:pal_encoder",
    "vlm": "mmalign.personalize.vlm:vlm_encoder",
}

ENCODER_SUMMARIES: dict[str, str] = {
    "mean_diff": "mean of f(preferred) - f(dispreferred) over the shots, normalised (frozen CLIP-family features); the baseline.",
    "pal": "PAL-B (Chen et al. 2024): prototype mixture on frozen features; a new user = K weights fitted on the shots.",
    "vlm": "PPD (Dang et al. 2025): a local LLaVA-family VLM reads the shots; last generated token's hidden state + profile text.",
}


def get_encoder(name: str, **kwargs: Any) -> UserEncoder:
    """Build a registered encoder (or a ``module:function`` factory) with its keyword arguments."""
    target = ENCODERS.get(name, name if ":" in name else None)
    if target is None:
        raise KeyError(
            f"unknown user encoder {name!r}; registered: {', '.join(sorted(ENCODERS))} (or 'module:function')"
        )
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)(**kwargs)


# --------------------------------------------------------------------------------------------------
# mean_diff


@dataclass
class MeanDiffEncoder:
    """``normalize(mean_i f(preferred_i) - f(dispreferred_i))`` with frozen image features f."""

    features: Any  # mmalign.personalize.features.Features
    feature_spec: dict[str, Any]
    name: str = "mean_diff"

    def fingerprint(self) -> dict[str, Any]:
        return {"encoder": self.name, **self.feature_spec}

    @torch.no_grad()
    def encode(self, shots: Sequence[Shot]) -> UserEmbedding:
        from mmalign.personalize.shots import stack_images

        check_shots(shots)
        pref = self.features.images(stack_images([s.preferred for s in shots]))
        disp = self.features.images(stack_images([s.dispreferred for s in shots]))
        return UserEmbedding(F.normalize((pref - disp).mean(0).float(), dim=0))


def mean_diff(features: str = "clip_score", features_kwargs: dict[str, Any] | None = None) -> MeanDiffEncoder:
    """The mean-difference baseline on the image tower of ``features`` (a CLIP-family reward or ``module:function``)."""
    from mmalign.personalize.features import get_features

    kwargs = dict(features_kwargs or {})
    return MeanDiffEncoder(
        get_features(features, **kwargs), {"features": features, "features_kwargs": kwargs}
    )


def check_shots(shots: Sequence[Shot], n_min: int = 1) -> None:
    if len(shots) < n_min:
        raise ValueError(f"need at least {n_min} shot(s), got {len(shots)}")
    for s in shots:
        for which in ("preferred", "dispreferred"):
            img = getattr(s, which)
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(
                    f"{s.where or s.prompt}: {which} image must be [3,H,W], got {tuple(img.shape)}"
                )


# --------------------------------------------------------------------------------------------------
# cache


def shots_hash(shots: Sequence[Shot]) -> str:
    """Content hash of the shots: their prompts and decoded pixels (8-bit), in order."""
    h = hashlib.sha256()
    for s in shots:
        h.update(s.prompt.encode())
        for img in (s.preferred, s.dispreferred):
            h.update((img.clamp(0, 1) * 255).round().to(torch.uint8).contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(user: str, shots: Sequence[Shot], fingerprint: dict[str, Any]) -> str:
    blob = json.dumps(
        {"user": str(user), "shots": shots_hash(shots), "encoder": fingerprint}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cached_encode(
    encoder: UserEncoder, user: str, shots: Sequence[Shot], cache_dir: str | Path | None
) -> tuple[UserEmbedding, bool]:
    """Encode one group of shots through the cache. Returns (embedding, whether it came from the cache)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if cache_dir is None:
        return encoder.encode(shots), False
    path = Path(cache_dir) / f"{cache_key(user, shots, encoder.fingerprint())}.safetensors"
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            return UserEmbedding(f.get_tensor("vector"), (f.metadata() or {}).get("profile", "")), True
    emb = encoder.encode(shots)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {"vector": emb.vector.detach().float().cpu().contiguous()},
        str(tmp),
        metadata={
            "user": str(user),
            "profile": emb.profile,
            "encoder": json.dumps(encoder.fingerprint(), default=str),
        },
    )
    tmp.replace(path)
    return emb, False


def embed_users(
    encoder: UserEncoder,
    groups: dict[str, list[list[Shot]]],
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], dict[str, int]]:
    """Embed every user's shot groups.

    Args:
        encoder: the user encoder.
        groups: user id -> list of shot groups (each a list of N shots).
        cache_dir: per-user embedding cache (None: no cache).
        progress: show a progress bar.

    Returns:
        user -> vectors [G, D]; user -> profile texts (one per group); counts ``{"encoded", "cached"}``.
    """
    from tqdm.auto import tqdm

    vectors, profiles, counts = {}, {}, {"encoded": 0, "cached": 0}
    total = sum(len(g) for g in groups.values())
    bar = tqdm(total=total, desc=f"embed users ({encoder.name})", disable=not progress)
    for user, user_groups in groups.items():
        rows, texts = [], []
        for shots in user_groups:
            emb, hit = cached_encode(encoder, user, shots, cache_dir)
            counts["cached" if hit else "encoded"] += 1
            rows.append(emb.vector.float())
            texts.append(emb.profile)
            bar.update(1)
        vectors[str(user)] = torch.stack(rows)
        profiles[str(user)] = texts
    bar.close()
    return vectors, profiles, counts


def save_user_vectors(
    path: str | Path,
    vectors: dict[str, torch.Tensor],
    encoder: UserEncoder,
    profiles: dict[str, list[str]] | None = None,
) -> Path:
    """``user_vectors.safetensors``: one [G, D] tensor per user id; the encoder fingerprint in the metadata.

    Profiles (VLM) go to ``<stem>.profiles.jsonl`` beside it, one line per user.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {str(u): v.float().contiguous() for u, v in vectors.items()},
        str(path),
        metadata={"encoder": json.dumps(encoder.fingerprint(), default=str)},
    )
    if profiles and any(t for texts in profiles.values() for t in texts):
        lines = [json.dumps({"user": u, "profiles": texts}) for u, texts in profiles.items()]
        path.with_suffix(".profiles.jsonl").write_text("\n".join(lines) + "\n")
    return path


def load_user_vectors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read :func:`save_user_vectors`' file -> (user -> [G, D], encoder fingerprint)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"user vectors not found: {path} (make them with `mmalign personalize embed`)"
        )
    with safe_open(str(path), "pt") as f:
        vectors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads((f.metadata() or {}).get("encoder", "{}"))
    return vectors, meta
