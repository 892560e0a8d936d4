"""Trainers: one file per method (its Config dataclass + ``compute_loss``), one loop (``loop.py``).

``METHODS`` is the explicit registry the CLI and the loop read. A :class:`Method` contributes:

- ``config_cls``: a dataclass with ``name`` and its hyper-parameters (paper defaults, help strings);
- ``compute_loss(batch, models, cfg) -> (loss, metrics)``: the scalar to back-propagate and detached metrics;
- ``build_data(run_cfg, adapter, accelerator) -> TrainData``: its training data (:mod:`mmalign.trainers.data`);
- ``make_state`` (optional): per-run method state from ``(models, cfg)``, e.g. an EMA teacher. The loop hands it
  to ``compute_loss`` as ``models.state``, calls its ``after_optimizer_step()`` after every optimizer step and
  checkpoints it (``state_dict``/``load_state_dict``), so a resumed run continues it exactly;
- ``needs_reference(cfg)``: whether full fine-tuning must keep a frozen reference copy (Self-NPO with an EMA
  teacher never reads one);
- ``noise_processes``: the pipeline noise processes it supports (methods built on ``alphas_cumprod`` -- DDIM
  inversion, DDIM teachers -- need "ddpm"); ``why_unet``: set when it trains only UNet families; both checked at
  config validation (:func:`load_config`, :func:`check_family`).

- ``add_trainable`` (optional): ``(denoiser, run_cfg) -> None`` adding the method's own modules to the frozen
  denoiser and marking which of their weights train (personal_dpo's user path). The loop then makes no
  full-fine-tune copy: only those weights (plus a LoRA when ``lora.enabled``) train, and ``compute_loss`` reaches
  the reference by switching its own path off;
- ``export`` (optional): ``(pipe, denoiser, denoiser_name, run_cfg, out_dir) -> Path`` replacing the loop's
  LoRA/full export (personal_dpo writes an IP-Adapter-format user adapter).

:func:`load_config` is :func:`mmalign.config.load_config` given these method configs, plus the method/family
compatibility check.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign import config as _config
from mmalign.config import ConfigError, RunConfig
from mmalign.pipelines import FAMILIES, family_of_class, resolve_pretrained
from mmalign.trainers import data, dense_dpo, diffusion_dpo, inversion_dpo, personal_dpo, self_npo


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    compute_loss: Callable[..., Any]
    build_data: Callable[..., Any]
    summary: str
    make_state: Callable[..., Any] | None = None
    needs_reference: Callable[[Any], bool] = lambda cfg: True
    noise_processes: tuple[str, ...] = ("ddpm", "flow")
    why_ddpm: str = ""  # the sentence saying why a "ddpm"-only method cannot train a flow model
    add_trainable: Callable[..., Any] | None = None
    export: Callable[..., Any] | None = None
    why_unet: str = ""  # set for a method that trains only UNet families: the sentence saying why
    buckets: bool = False  # trains on aspect-ratio buckets (data.buckets); the others train at one size


METHODS: dict[str, Method] = {
    "diffusion_dpo": Method(
        "diffusion_dpo",
        diffusion_dpo.DiffusionDPOConfig,
        diffusion_dpo.compute_loss,
        data.image_pairs,
        "Diffusion-DPO (Wallace et al. 2023): preference pairs, shared noise and timestep; sigmoid/hinge/ipo, f-DPO, Diffusion-NPO via swap_pairs.",
        buckets=True,
    ),
    "inversion_dpo": Method(
        "inversion_dpo",
        inversion_dpo.InversionDPOConfig,
        inversion_dpo.compute_loss,
        data.inversion_pairs,
        "Inversion-DPO (Li et al. 2025): DDIM-inverted noising with cached inversions; inverted_noise (InPO-style) or trajectory (released code) mode.",
        noise_processes=("ddpm",),
        why_ddpm="its DDIM inversion and implied noise are defined on a DDPM schedule (alphas_cumprod)",
    ),
    "self_npo": Method(
        "self_npo",
        self_npo.SelfNPOConfig,
        self_npo.compute_loss,
        data.prompts,
        "Self-NPO (Wang et al. 2025): data-free negative model for NPO guidance; EMA teacher, truncated DDIM, pseudo-Huber. Prompts only.",
        make_state=self_npo.make_state,
        needs_reference=lambda cfg: cfg.ema_decay >= 1.0,
        noise_processes=("ddpm",),
        why_ddpm="its DDIM teacher rollout and re-noising use the DDPM schedule's alphas_cumprod",
        why_unet="its negative model is used only through NPO guidance, which drives UNet pipelines",
    ),
    "dense_dpo": Method(
        "dense_dpo",
        dense_dpo.DenseDPOConfig,
        dense_dpo.compute_loss,
        data.video_pairs,
        "DenseDPO (Wu et al. 2025): video pairs with per-segment labels mapped to latent frames, ties masked; vanilla whole-clip video DPO via loss=vanilla.",
    ),
    "personal_dpo": Method(
        "personal_dpo",
        personal_dpo.PersonalDPOConfig,
        personal_dpo.compute_loss,
        data.user_pairs,
        "PPD (Dang et al. 2025): user-conditioned Diffusion-DPO; user vector -> IP-Adapter-style decoupled cross-attention, only K'/V' + projection (+ optional LoRA) train.",
        add_trainable=personal_dpo.add_trainable,
        export=personal_dpo.export,
        why_unet="its user path is an IP-Adapter-style projection in a UNet's cross-attention",
        buckets=True,
    ),
}

METHOD_CONFIGS: dict[str, type] = {name: method.config_cls for name, method in METHODS.items()}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def check_family(method_cfg: Any, family: str, noise_process: str) -> None:
    """Raise a one-sentence ConfigError when the method, as configured, cannot train ``family`` (its pipeline's
    ``noise_process``): a DDPM-only method on a flow-matching model, or a method that needs a UNet (personal_dpo's
    user path; a negative model, which only NPO guidance uses: Self-NPO, Diffusion-DPO with ``swap_pairs``) on a
    family that denoises with a transformer."""
    method = get_method(method_cfg.name)
    what, why_unet = f"method.name={method.name}", method.why_unet
    if not why_unet and getattr(method_cfg, "swap_pairs", False):
        what = f"{what} with method.swap_pairs=true"
        why_unet = (
            "Diffusion-NPO's negative model is used only through NPO guidance, which drives UNet pipelines"
        )

    def unet(spec: Any) -> bool:
        return getattr(spec.adapter, "denoiser_name", "unet") == "unet"

    fits = sorted(
        f
        for f, spec in FAMILIES.items()
        if spec.noise_process in method.noise_processes and (unet(spec) or not why_unet)
    )
    if noise_process not in method.noise_processes:
        raise ConfigError(
            f"{what} cannot train model.family={family}: {method.why_ddpm or 'it needs a DDPM schedule'}, "
            f"and {family} is a {noise_process}-matching model; use a {'/'.join(method.noise_processes)} family "
            f"({', '.join(fits)}) or a method that supports flow matching (diffusion_dpo, dense_dpo)."
        )
    if why_unet and family in FAMILIES and not unet(FAMILIES[family]):
        raise ConfigError(
            f"{what} cannot train model.family={family}: {why_unet}, and {family} denoises with a "
            f"{FAMILIES[family].adapter.denoiser_name}; use a UNet family ({', '.join(fits)})"
        )


def _local_index(cfg: RunConfig) -> dict[str, Any] | None:
    """The model's ``model_index.json`` when it is a local directory (no network), else None."""
    index = Path(resolve_pretrained(cfg.model.pretrained)) / "model_index.json"
    try:
        meta = json.loads(index.read_text()) if index.is_file() else None
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _static_family(cfg: RunConfig, index: dict[str, Any] | None) -> str | None:
    """The family known without loading weights: model.family, or a local model_index.json."""
    if cfg.model.family != "auto":
        return cfg.model.family
    return family_of_class(index.get("_class_name")) if index is not None else None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a recipe (:func:`mmalign.config.load_config` with every registered method) and check that the method
    can train the model's family (when the family is known before loading weights)."""
    cfg = _config.load_config(path, overrides, method_configs=METHOD_CONFIGS)
    if not get_method(cfg.method.name).buckets:  # what data preparation would refuse after loading the model
        try:
            data.square_only(cfg, cfg.method.name)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}" if path else str(err)) from None
    index = _local_index(cfg)
    family = _static_family(cfg, index)
    if family is not None:
        if family not in FAMILIES:
            raise ConfigError(
                f"{path or 'config'}: model.family={family!r} is unknown; choose from {sorted(FAMILIES)} or auto"
            )
        try:
            check_family(cfg.method, family, FAMILIES[family].noise_process)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}" if path else str(err)) from None
    return cfg


def check_training_run(cfg: RunConfig) -> None:
    """The model family's own refusals of a training run (``check_config`` of its adapter: a Wan 2.2 A14B run
    that names no expert), from a local ``model_index.json`` without loading weights; ``mmalign validate`` runs
    it, and the loop runs the same check on the loaded pipeline (a hub id included). Nothing for a model that is
    not a local directory."""
    index = _local_index(cfg)
    family = _static_family(cfg, index)
    check = getattr(FAMILIES[family].adapter, "check_config", None) if family in FAMILIES else None
    if check is not None and index is not None:
        check(index, cfg)
    if family in FAMILIES and index is not None:
        check_clip_length(cfg, family)


def check_clip_length(cfg: RunConfig, family: str) -> None:
    """A video method's ``method.num_frames`` must be a length the family's VAE encodes as it is (Wan, CogVideoX:
    4k+1); the loop checks it again on any model, ``mmalign validate`` on a local one."""
    from mmalign.pipelines import check_num_frames

    try:
        check_num_frames(
            resolve_pretrained(cfg.model.pretrained),
            family,
            getattr(cfg.method, "num_frames", None),
            flag="method.num_frames",
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


__all__ = [
    "METHODS",
    "METHOD_CONFIGS",
    "Method",
    "check_clip_length",
    "check_family",
    "check_training_run",
    "get_method",
    "load_config",
]
