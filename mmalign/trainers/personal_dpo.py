"""User-conditioned Diffusion-DPO (PPD, Dang et al. 2025, arXiv 2501.06655): config + compute_loss.

Policy e_theta(x_t, c, u, t) = the denoiser with the user path (:mod:`mmalign.personalize.attention`) fed the
pair's user vector u; reference = the base without the user path (u = 0 adds exactly nothing; with a LoRA the
adapters are disabled too). Canonical beta: z = -(beta/2) * (dtheta_w - dtheta_l), dtheta = err_policy - err_ref
(see :func:`mmalign.losses.diffusion_dpo.diffusion_dpo_loss`). Only the user projection and every layer's K'/V'
train (plus a LoRA when ``lora.enabled``). The user vector is zeroed with probability ``user_dropout`` (PPD
drops it at random; the rate is not given in the sources).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmalign.config import ConfigError, _f
from mmalign.losses.diffusion_dpo import LOSS_TYPES, diffusion_dpo_loss
from mmalign.pipelines import per_sample_mse
from mmalign.trainers.common import TrainModels, noised_pairs, repeat_cond


@dataclass
class PersonalDPOConfig:
    name: str = _f("personal_dpo", "Method name.")
    user_vectors: str = _f(
        "",
        "user_vectors.safetensors from `mmalign personalize embed` (one [G, D] tensor per user id of the training pairs).",
    )
    beta: float = _f(
        5000.0,
        "KL strength; logit z = -(beta/2)(delta_w - delta_l) (canonical convention, as diffusion_dpo).",
    )
    loss_type: str = _f("sigmoid", "sigmoid (DPO) | hinge | ipo.")
    sft_weight: float = _f(0.0, "Adds sft_weight x winner error.")
    user_dropout: float = _f(
        0.1,
        "Probability of zeroing a pair's user vector (PPD drops it at random; rate not given in the sources).",
    )
    user_scale: float = _f(1.0, "Scale of the user path in training.")
    init_seed: int = _f(0, "Seed of the user projection's initial weights.")

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"method.loss_type={self.loss_type!r}: choose from {LOSS_TYPES}")
        if self.beta <= 0:
            raise ConfigError(f"method.beta={self.beta} must be > 0 (typical: 2000-5000)")
        if not 0.0 <= self.user_dropout < 1.0:
            raise ConfigError(f"method.user_dropout={self.user_dropout} must be in [0, 1)")


def add_trainable(denoiser: torch.nn.Module, cfg: Any) -> None:
    """Loop hook: install the user path (its width read from the user vectors) and make only it trainable."""
    from mmalign.personalize.attention import add_user_path, set_user_scale
    from mmalign.personalize.encoders import load_user_vectors

    if not cfg.method.user_vectors:
        raise ConfigError(
            "method.user_vectors is empty: make them with `mmalign personalize embed` and set the path"
        )
    vectors, _ = load_user_vectors(cfg.method.user_vectors)
    dims = {v.shape[-1] for v in vectors.values()}
    if len(dims) != 1:
        raise ConfigError(f"{cfg.method.user_vectors}: user vectors of different widths {sorted(dims)}")
    add_user_path(denoiser, dims.pop(), seed=cfg.method.init_seed)
    set_user_scale(denoiser, cfg.method.user_scale)


def export(pipe: Any, denoiser: torch.nn.Module, denoiser_name: str, cfg: Any, out_dir: Path) -> Path:
    """``user_adapter.safetensors`` (load with ``pipe.load_ip_adapter``) + the LoRA, when one was trained."""
    from mmalign.personalize.attention import save_user_adapter
    from mmalign.personalize.encoders import load_user_vectors

    _, encoder = load_user_vectors(cfg.method.user_vectors)
    save_user_adapter(
        denoiser,
        out_dir,
        {
            "encoder": encoder,
            "user_vectors": str(Path(cfg.method.user_vectors).resolve()),
            "lora": bool(cfg.lora.enabled),
        },
    )
    if cfg.lora.enabled:
        from diffusers.utils import convert_state_dict_to_diffusers

        from mmalign.trainers.loop import lora_layers_for_export

        layers = convert_state_dict_to_diffusers(lora_layers_for_export(denoiser))
        type(pipe).save_lora_weights(
            out_dir, **{f"{denoiser_name}_lora_layers": layers}, safe_serialization=True
        )
    return out_dir


@contextlib.contextmanager
def _reference(models: TrainModels):
    """The base: LoRA adapters off when there are any (the user path is switched off by u = 0)."""
    net = models.unwrap(models.denoiser)
    if getattr(net, "_hf_peft_config_loaded", False):
        with models.reference() as ref:
            yield ref
    else:
        with torch.no_grad():
            yield models.denoiser


def compute_loss(
    batch: dict, models: TrainModels, cfg: PersonalDPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One user-conditioned Diffusion-DPO step.

    Args:
        batch: ``latents_w``/``latents_l`` [B,C,H,W], ``cond`` with ``image_embeds`` [B, D] (the pairs' user vectors).
        models: adapter, denoiser with the user path, reference access.
        cfg: the method config.
    """
    adapter = models.adapter
    pairs = noised_pairs(adapter, batch["latents_w"], batch["latents_l"])
    cond = dict(batch["cond"])
    user = cond.pop("image_embeds")
    if cfg.user_dropout > 0:
        keep = (torch.rand(user.shape[0], device=user.device) >= cfg.user_dropout).to(user.dtype)
        user = user * keep[:, None]
    policy_cond = repeat_cond({**cond, "image_embeds": user})
    ref_cond = repeat_cond({**cond, "image_embeds": torch.zeros_like(user)})
    model_err = per_sample_mse(
        adapter.predict(models.denoiser, pairs["xt"], pairs["t"], policy_cond), pairs["target"]
    )
    with _reference(models) as ref:
        ref_err = per_sample_mse(adapter.predict(ref, pairs["xt"], pairs["t"], ref_cond), pairs["target"])
    m_w, m_l = model_err.chunk(2)
    r_w, r_l = ref_err.chunk(2)
    loss, metrics = diffusion_dpo_loss(
        m_w,
        m_l,
        r_w.detach(),
        r_l.detach(),
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        sft_weight=cfg.sft_weight,
    )
    return loss.mean(), metrics
