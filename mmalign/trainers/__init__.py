"""Trainers: one file per method (its Config dataclass + ``compute_loss``), one loop (``loop.py``).

``METHODS`` is the explicit registry the config loader and the CLI read. A method contributes:

- ``config_cls``: a dataclass with ``name`` and its hyper-parameters (paper defaults, help strings);
- ``compute_loss(batch, models, cfg) -> (loss, metrics)``: the scalar to back-propagate and detached metrics;
- ``data``: ``"module:function"`` building its training data (image pairs, video pairs, prompts only ...).
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
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]
