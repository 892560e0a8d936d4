"""Each method's training data from a run config: the run config's sections -> the data builders' flat arguments.

The builders in :mod:`mmalign.data` never see a run config; this module is the one place that reads it for them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mmalign.config import ConfigError, RunConfig
from mmalign.data.images import DataError
from mmalign.data.inversion_pairs import InversionSpec, inversion_pair_data
from mmalign.data.prompts import prompt_data
from mmalign.data.setup import TrainData, cache_root, image_pair_data, model_fingerprint
from mmalign.data.users import personal_pair_data
from mmalign.data.video_pairs import video_pair_data


def _common(cfg: RunConfig, adapter: Any) -> dict[str, Any]:
    m = cfg.model
    return {
        "cache_dir": cache_root(cfg.data.cache_dir, cfg.train.output_dir),
        "model_id": model_fingerprint(
            adapter, pretrained=m.pretrained, revision=m.revision, variant=m.variant, vae=m.vae
        ),
        "progress": cfg.train.progress,
    }


def enough_for_a_batch(data: TrainData, cfg: RunConfig, what: str) -> TrainData:
    """``data``, or a DataError (exit 2, naming data.source) when its usable items cannot fill one batch."""
    n = len(data.dataset)
    if n < cfg.train.batch_size:
        raise DataError(
            f"{cfg.data.source}: {n} usable {what} is fewer than train.batch_size={cfg.train.batch_size}; "
            "lower train.batch_size or add data"
        )
    return data


def square_only(cfg: RunConfig, what: str) -> None:
    """A ConfigError when ``data.buckets`` is on for data that trains at one fixed size."""
    if cfg.data.buckets:
        raise ConfigError(
            f"data.buckets=true: {what} trains at one size (model.resolution / method.height x width); "
            "aspect-ratio buckets are for image pairs (diffusion_dpo, personal_dpo)"
        )


def image_pairs(cfg: RunConfig, adapter: Any, accelerator: Any) -> TrainData:
    """Preference pairs of images (Diffusion-DPO and its variants)."""
    data = image_pair_data(
        adapter, accelerator, cfg.data, resolution=cfg.model.resolution, **_common(cfg, adapter)
    )
    return enough_for_a_batch(data, cfg, "pairs")


def inversion_pairs(cfg: RunConfig, adapter: Any, accelerator: Any) -> TrainData:
    """Image pairs with their cached DDIM inversions (Inversion-DPO)."""
    square_only(cfg, "inversion_dpo")
    spec = InversionSpec(**{f.name: getattr(cfg.method, f.name) for f in dataclasses.fields(InversionSpec)})
    data = inversion_pair_data(
        adapter, accelerator, cfg.data, spec, resolution=cfg.model.resolution, **_common(cfg, adapter)
    )
    return enough_for_a_batch(data, cfg, "pairs")


def prompts(cfg: RunConfig, adapter: Any, accelerator: Any) -> TrainData:
    """Prompts only, with real images when the method starts from them (Self-NPO ``start=real``)."""
    square_only(cfg, cfg.method.name)
    need_images = getattr(cfg.method, "start", "noise") == "real"
    data = prompt_data(
        adapter,
        accelerator,
        cfg.data,
        resolution=cfg.model.resolution,
        need_images=need_images,
        **_common(cfg, adapter),
    )
    return enough_for_a_batch(data, cfg, "prompts")


def user_pairs(cfg: RunConfig, adapter: Any, accelerator: Any) -> TrainData:
    """Image pairs with each pair's user vector (personal_dpo)."""
    return personal_pair_data(
        adapter,
        accelerator,
        cfg.data,
        cfg.method.user_vectors,
        resolution=cfg.model.resolution,
        **_common(cfg, adapter),
    )


def video_pairs(cfg: RunConfig, adapter: Any, accelerator: Any) -> TrainData:
    """Video pairs with per-segment labels (DenseDPO, and whole-clip video DPO with ``loss=vanilla``)."""
    square_only(cfg, cfg.method.name)
    mc, res = cfg.method, cfg.model.resolution
    return enough_for_a_batch(
        video_pair_data(
            adapter,
            accelerator,
            cfg.data,
            dense=mc.loss == "dense",
            min_non_tie=mc.min_non_tie,
            height=mc.height or res,
            width=mc.width or res,
            fps=mc.fps,
            num_frames=mc.num_frames,
            segment_seconds=mc.segment_seconds,
            straddle=mc.straddle,
            video_backend=mc.video_backend,
            **_common(cfg, adapter),
        ),
        cfg,
        "video pairs",
    )
