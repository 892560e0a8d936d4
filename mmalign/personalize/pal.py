"""PAL-B (Chen et al. 2024, arXiv 2406.08469; RamyaLab/pluralistic-alignment ``src/pal_rm_b``): a per-user reward.

On frozen image features e(x) and prompt features e(c) of a CLIP-family backbone:

    f(x)      = MLP_f(e(x))                         item embedding, d dims
    a_u(c)    = sum_k softmax(W_u)_k * MLP_k(e(c))  user u's ideal point for prompt c (K prototypes)
    score     = s * cos(f(x), a_u(c)),  s = exp(logit_scale) clamped at 100
    loss      = -log sigmoid(score(x_w) - score(x_l))  (cross-entropy of the pair)

Trained on the seen users' pairs (every weight, including each seen user's K logits W_u). An unseen user is
fitted from n shots by optimising only a fresh ``W_u ~ N(0, I)`` with everything else frozen, for 20 epochs at
lr 5e-3 (``main_pal_b_unseen.py``). Without prompt features (a backbone with no text tower) every prototype
is a free vector, i.e. the ideal point does not depend on the prompt.

The user's vector for the generator is the ideal point for the empty prompt, L2-normalised.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmalign.personalize.encoders import Shot, UserEmbedding, check_shots

HEAD_FILE = "pal_head.safetensors"
HEAD_META = "pal_head.json"


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class PALB(nn.Module):
    """The PAL-B head: item MLP, K prompt-conditioned prototypes, one K-vector of logits per seen user."""

    def __init__(self, image_dim: int, text_dim: int, *, dim: int = 512, k: int = 2, n_users: int = 0):
        super().__init__()
        self.image_dim, self.text_dim, self.dim, self.k = image_dim, text_dim, dim, k
        self.f = _mlp(image_dim, dim)
        self.g = nn.ModuleList([_mlp(text_dim, dim) for _ in range(k)])
        self.user_logits = nn.Parameter(torch.randn(n_users, k))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def ideal_point(self, logits: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[B,K] user logits, [B,E] prompt features -> [B,d] ideal points."""
        protos = torch.stack([g(text) for g in self.g], dim=1)  # [B,K,d]
        return (logits.softmax(-1)[..., None] * protos).sum(1)

    def score(self, image: torch.Tensor, text: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """[B,D] image features, [B,E] prompt features, [B,K] logits -> [B] scores."""
        scale = self.logit_scale.exp().clamp(max=100.0)
        return scale * F.cosine_similarity(self.f(image), self.ideal_point(logits, text), dim=-1)


def pair_loss(
    model: PALB, fw: torch.Tensor, fl: torch.Tensor, text: torch.Tensor, logits: torch.Tensor
) -> torch.Tensor:
    return -F.logsigmoid(model.score(fw, text, logits) - model.score(fl, text, logits)).mean()


def train_pal(
    fw: torch.Tensor,
    fl: torch.Tensor,
    text: torch.Tensor,
    users: torch.Tensor,
    n_users: int,
    *,
    dim: int = 512,
    k: int = 2,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> PALB:
    """Train PAL-B on seen users' pairs: features of winners [N,D], losers [N,D], prompts [N,E], user index [N]."""
    from tqdm.auto import trange

    torch.manual_seed(seed)
    model = PALB(fw.shape[1], text.shape[1], dim=dim, k=k, n_users=n_users)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in trange(epochs, desc="train PAL-B", disable=not progress):
        order = torch.randperm(len(fw), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = pair_loss(model, fw[idx], fl[idx], text[idx], model.user_logits[users[idx]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def fit_user(
    model: PALB,
    fw: torch.Tensor,
    fl: torch.Tensor,
    text: torch.Tensor,
    *,
    epochs: int = 20,
    lr: float = 5e-3,
    batch_size: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    """Fit an unseen user's K logits on n shots with everything else frozen (PAL's unseen-user recipe).

    Returns:
        [K] logits (softmax = the user's mixture weights).
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, model.k, generator=g).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    model.requires_grad_(False)
    with torch.no_grad():  # everything but the logits is frozen: embed items and prototypes once
        ew, el = model.f(fw), model.f(fl)
        protos = torch.stack([gk(text) for gk in model.g], dim=1)  # [N,K,d]
        scale = model.logit_scale.exp().clamp(max=100.0)
    for _ in range(epochs):
        order = torch.randperm(len(fw), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            ideal = (logits.softmax(-1)[..., None] * protos[idx]).sum(1)
            margin = scale * (
                F.cosine_similarity(ew[idx], ideal, dim=-1) - F.cosine_similarity(el[idx], ideal, dim=-1)
            )
            loss = -F.logsigmoid(margin).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return logits.detach()[0]


def save_pal(model: PALB, out_dir: str | Path, users: Sequence[str], meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out_dir / HEAD_FILE)
    info = {
        "image_dim": model.image_dim,
        "text_dim": model.text_dim,
        "dim": model.dim,
        "k": model.k,
        "users": [str(u) for u in users],
        **meta,
    }
    (out_dir / HEAD_META).write_text(json.dumps(info, indent=1))
    return out_dir


def load_pal(head_dir: str | Path) -> tuple[PALB, dict[str, Any]]:
    from safetensors.torch import load_file

    head_dir = Path(head_dir)
    if not (head_dir / HEAD_META).is_file():
        raise FileNotFoundError(f"{head_dir}: no {HEAD_META} (train a head with `mmalign personalize fit`)")
    info = json.loads((head_dir / HEAD_META).read_text())
    model = PALB(
        info["image_dim"], info["text_dim"], dim=info["dim"], k=info["k"], n_users=len(info["users"])
    )
    model.load_state_dict(load_file(head_dir / HEAD_FILE))
    return model.eval().requires_grad_(False), info


def prompt_features(features: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Prompt features [N,E]; a constant [N,1] when the backbone has no text tower."""
    if features.texts is None:
        return torch.ones(len(prompts), 1)
    return features.texts(list(prompts)).float()


@dataclass
class PALHead:
    """A trained PAL-B head with its frozen features: scores media for a user, fits new users."""

    model: PALB
    features: Any
    info: dict[str, Any]
    fit_epochs: int = 20
    fit_lr: float = 5e-3
    fit_batch_size: int = 1
    seed: int = 0
    _user_index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._user_index = {u: i for i, u in enumerate(self.info["users"])}

    def seen_logits(self, user: str) -> torch.Tensor:
        if str(user) not in self._user_index:
            known = self.info["users"]
            raise KeyError(
                f"unknown user {user!r}: the PAL head knows {len(known)} users ({', '.join(known[:5])} ...); "
                "pass --user-shots FILE for a new user"
            )
        return self.model.user_logits[self._user_index[str(user)]].detach()

    @torch.no_grad()
    def shot_features(self, shots: Sequence[Shot]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from mmalign.personalize.shots import stack_images

        fw = self.features.images(stack_images([s.preferred for s in shots])).float()
        fl = self.features.images(stack_images([s.dispreferred for s in shots])).float()
        return fw, fl, prompt_features(self.features, [s.prompt for s in shots])

    def fit(self, shots: Sequence[Shot]) -> torch.Tensor:
        """K logits of a new user from their shots."""
        check_shots(shots)
        fw, fl, text = self.shot_features(shots)
        return fit_user(
            self.model,
            fw,
            fl,
            text,
            epochs=self.fit_epochs,
            lr=self.fit_lr,
            batch_size=self.fit_batch_size,
            seed=self.seed,
        )

    @torch.no_grad()
    def vector(self, logits: torch.Tensor) -> torch.Tensor:
        """The user's ideal point for the empty prompt, normalised: the generator's user vector."""
        text = prompt_features(self.features, [""])
        return F.normalize(self.model.ideal_point(logits[None], text)[0], dim=0)

    @torch.no_grad()
    def score(self, media: torch.Tensor, prompts: Sequence[str], logits: torch.Tensor) -> torch.Tensor:
        """[B] PAL scores of images [B,3,H,W] in [0,1] for the user with ``logits`` [K]."""
        image = self.features.images(media).float()
        text = prompt_features(self.features, prompts)
        return self.model.score(image, text, logits[None].expand(len(image), -1))


def load_head(
    head: str | Path, *, fit_epochs: int = 20, fit_lr: float = 5e-3, fit_batch_size: int = 1, seed: int = 0
) -> PALHead:
    """A saved PAL-B head with the features it was trained on (rebuilt from its metadata)."""
    from mmalign.personalize.features import get_features

    model, info = load_pal(head)
    features = get_features(info["features"], **info.get("features_kwargs", {}))
    return PALHead(model, features, info, fit_epochs, fit_lr, fit_batch_size, seed)


@dataclass
class PALEncoder:
    """User encoder ``pal``: fit the user's K weights on the shots; vector = their ideal point."""

    head: PALHead
    head_path: str
    name: str = "pal"

    def fingerprint(self) -> dict[str, Any]:
        import hashlib

        weights = Path(self.head_path) / HEAD_FILE
        return {
            "encoder": self.name,
            "head": str(Path(self.head_path).resolve()),
            "head_sha256": hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None,
            "fit": [self.head.fit_epochs, self.head.fit_lr, self.head.fit_batch_size, self.head.seed],
        }

    def encode(self, shots: Sequence[Shot]) -> UserEmbedding:
        logits = self.head.fit(shots)
        weights = ", ".join(f"{w:.2f}" for w in logits.softmax(0).tolist())
        return UserEmbedding(self.head.vector(logits), f"PAL mixture weights: [{weights}]")


def pal_encoder(
    head: str, fit_epochs: int = 20, fit_lr: float = 5e-3, fit_batch_size: int = 1, seed: int = 0
) -> PALEncoder:
    """The ``pal`` user encoder on a head trained by ``mmalign personalize fit``."""
    return PALEncoder(
        load_head(head, fit_epochs=fit_epochs, fit_lr=fit_lr, fit_batch_size=fit_batch_size, seed=seed), head
    )


def pal_reward(
    head: str,
    user: str | None = None,
    user_shots: str | None = None,
    fit_epochs: int = 20,
    fit_lr: float = 5e-3,
    seed: int = 0,
):
    """PAL-B per-user reward: a seen ``user`` of the head, or a new one fitted on ``user_shots`` (a pair manifest;
    with ``user`` too, only that user's rows)."""
    from mmalign.personalize.shots import read_shots

    pal = load_head(head, fit_epochs=fit_epochs, fit_lr=fit_lr, seed=seed)
    if user is None and user_shots is None:
        raise ValueError(
            "the pal reward needs user=ID (a user the head was trained on) or user_shots=FILE (a new user)"
        )
    if user_shots is not None:
        logits = pal.fit(read_shots(user_shots, user=user))
    else:
        logits = pal.seen_logits(user)

    def reward(media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if media.dim() == 5:  # videos: mean over frames
            b, t = media.shape[:2]
            return (
                pal.score(media.flatten(0, 1), [p for p in prompts for _ in range(t)], logits)
                .view(b, t)
                .mean(1)
            )
        return pal.score(media, prompts, logits)

    return reward
