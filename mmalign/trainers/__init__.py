"""Trainers: one file per method (its Config dataclass + ``compute_loss``), one loop (``loop.py``).

``METHODS`` is the explicit registry the config loader and the CLI read. A method contributes:

- ``config_cls``: a dataclass with ``name`` and its hyper-parameters (paper defaults, help strings);
- ``compute_loss(batch, models, cfg) -> (loss, metrics)``: the scalar to back-propagate and detached metrics;
- ``data``: ``"module:function"`` building its training data (image pairs, video pairs, prompts only ...);
- ``state`` (optional): ``"module:function"`` making per-run method state from ``(models, cfg)``, e.g. an EMA
  teacher. The loop hands it to ``compute_loss`` as ``models.state`` and checkpoints it with the run
  (it needs ``state_dict``/``load_state_dict``), so a resumed run continues it exactly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    config: str  # "module:ConfigClass"
    loss: str  # "module:compute_loss"
    data: str  # "module:builder" returning a TrainData
    summary: str
    state: str | None = None  # "module:make_state" -> object with state_dict/load_state_dict

    @property
    def make_state(self):
        return _load(self.state) if self.state else None

    @property
    def config_cls(self) -> type:
        return _load(self.config)

    @property
    def compute_loss(self):
        return _load(self.loss)

    @property
    def build_data(self):
        return _load(self.data)


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


METHODS: dict[str, Method] = {
    "diffusion_dpo": Method(
        "diffusion_dpo",
        "mmalign.trainers.diffusion_dpo:DiffusionDPOConfig",
        "mmalign.trainers.diffusion_dpo:compute_loss",
        "mmalign.data.setup:image_pair_data",
        "Diffusion-DPO (Wallace et al. 2023): preference pairs, shared noise and timestep; sigmoid/hinge/ipo, f-DPO, Diffusion-NPO via swap_pairs.",
    ),
    "inversion_dpo": Method(
        "inversion_dpo",
        "mmalign.trainers.inversion_dpo:InversionDPOConfig",
        "mmalign.trainers.inversion_dpo:compute_loss",
        "mmalign.trainers.inversion_dpo:inversion_pair_data",
        "Inversion-DPO (Li et al. 2025): DDIM-inverted noising with cached inversions; inverted_noise (InPO-style) or trajectory (released code) mode.",
    ),
    "self_npo": Method(
        "self_npo",
        "mmalign.trainers.self_npo:SelfNPOConfig",
        "mmalign.trainers.self_npo:compute_loss",
        "mmalign.data.prompts:prompt_data",
        "Self-NPO (Wang et al. 2025): data-free negative model for NPO guidance; EMA teacher, truncated DDIM, pseudo-Huber. Prompts only.",
        state="mmalign.trainers.self_npo:make_state",
    ),
    "dense_dpo": Method(
        "dense_dpo",
        "mmalign.trainers.dense_dpo:DenseDPOConfig",
        "mmalign.trainers.dense_dpo:compute_loss",
        "mmalign.trainers.dense_dpo:video_pair_data",
        "DenseDPO (Wu et al. 2025): video pairs with per-segment labels mapped to latent frames, ties masked; vanilla whole-clip video DPO via loss=vanilla.",
    ),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]
