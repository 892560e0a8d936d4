"""Pipeline adapters: one per diffusers family, behind the :class:`PipelineAdapter` protocol.

``FAMILIES`` maps a family name to (diffusers pipeline class name, "module:AdapterClass"). Adding a family
is one line here plus its adapter module.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from mmalign.pipelines.base import PipelineAdapter, per_frame_mse, per_sample_mse

FAMILIES: dict[str, tuple[str, str]] = {
    "sd15": ("StableDiffusionPipeline", "mmalign.pipelines.sd15:SD15Adapter"),
    "sdxl": ("StableDiffusionXLPipeline", "mmalign.pipelines.sdxl:SDXLAdapter"),
    "cogvideox": ("CogVideoXPipeline", "mmalign.pipelines.cogvideox:CogVideoXAdapter"),
    "wan": ("WanPipeline", "mmalign.pipelines.wan:WanAdapter"),
    "toy_video": ("AnimateDiffPipeline", "mmalign.pipelines.toy_video:ToyVideoAdapter"),
}


def _load_object(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def detect_family(pretrained: str, revision: str | None = None) -> str:
    """Family from the pipeline's ``model_index.json`` ``_class_name`` (local directory or hub id)."""
    index = Path(pretrained) / "model_index.json"
    if index.is_file():
        class_name = json.loads(index.read_text()).get("_class_name")
    else:
        from diffusers import DiffusionPipeline

        class_name = DiffusionPipeline.load_config(pretrained, revision=revision).get("_class_name")
    for family, (cls_name, _) in FAMILIES.items():
        if cls_name == class_name:
            return family
    raise ValueError(
        f"{pretrained}: pipeline class {class_name!r} has no mmalign adapter; set model.family to one of {sorted(FAMILIES)}"
    )


def load_pipeline(pretrained: str, *, family: str = "auto", revision: str | None = None, variant: str | None = None,
                  vae: str | None = None, torch_dtype: Any = None, trust_remote_code: bool = False) -> tuple[Any, str]:
    """Load a diffusers pipeline with ``from_pretrained`` (hub id or local path). Returns (pipeline, family)."""
    import diffusers

    if family == "auto":
        family = detect_family(pretrained, revision)
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r} is unknown; choose from {sorted(FAMILIES)} or auto")
    cls = getattr(diffusers, FAMILIES[family][0])
    kwargs: dict[str, Any] = {"revision": revision, "variant": variant}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if vae is not None:
        kwargs["vae"] = diffusers.AutoencoderKL.from_pretrained(vae, torch_dtype=torch_dtype)
    pipe = cls.from_pretrained(pretrained, **kwargs)
    return pipe, family


def make_adapter(pipeline: Any, family: str) -> PipelineAdapter:
    return _load_object(FAMILIES[family][1])(pipeline)


__all__ = ["FAMILIES", "PipelineAdapter", "detect_family", "load_pipeline", "make_adapter", "per_frame_mse", "per_sample_mse"]
