"""Tensor image preprocessing for CLIP-family rewards: batched, device-agnostic and differentiable.

Each reward model ships a PIL processor; running it in the training loop forces a GPU -> CPU -> PIL round
trip and cuts the graph. These functions reproduce the two layouts on tensors:

- ``shortest``: resize the shortest side to ``size`` (bicubic, antialiased) then centre-crop (CLIP, PickScore).
- ``longest``: resize the longest side to ``size`` then zero-pad to a square (HPSv2 letterbox).

Parity with each model's own PIL processor is checked in ``tests/unit/test_rewards_preprocess.py``; expect
differences of about 1e-2 after normalisation (PIL resizes uint8 pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageTransform:
    """How a reward model wants its pixels.

    Attributes:
        size: Output side in pixels (square output).
        resize_mode: ``shortest`` (resize + centre crop), ``longest`` (resize + pad) or ``squash``.
        mean: Per-channel mean for normalisation.
        std: Per-channel std for normalisation.
        crop_rounding: ``floor`` (transformers' centre crop) or ``round`` (torchvision's, used by open_clip).
        fill: Pad value in [0, 1] pixel units for ``longest`` (HPS pads with 0 before normalising).
    """

    size: int = 224
    resize_mode: str = "shortest"
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    crop_rounding: str = "floor"
    fill: float = 0.0

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"resize_mode={self.resize_mode!r}: use shortest, longest or squash.")
        if self.crop_rounding not in ("floor", "round"):
            raise ValueError(f"crop_rounding={self.crop_rounding!r}: use floor or round.")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the transform.

        Args:
            images: [B, 3, H, W] float pixels in [0, 1] (any device/dtype; gradients flow).

        Returns:
            [B, 3, size, size] normalised pixels.
        """
        return preprocess_images(images, self)


def _resize(images: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == hw:
        return images
    x = images
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()  # torch's CPU antialiased bicubic has no half-precision kernel
    out = F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0.0, 1.0).to(images.dtype)  # PIL clips bicubic overshoot to the uint8 range


def preprocess_images(images: torch.Tensor, tf: ImageTransform) -> torch.Tensor:
    """Resize, crop or pad, and normalise a batch of images (see :class:`ImageTransform`).

    Args:
        images: [B, 3, H, W] float in [0, 1].
        tf: The model's transform.

    Returns:
        [B, 3, tf.size, tf.size] normalised tensor, same device and dtype as ``images``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B,3,H,W], got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    s = tf.size
    if tf.resize_mode == "squash":
        x = _resize(images, (s, s))
    elif tf.resize_mode == "shortest":
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(s * long / short)
        hw = (s, new_long) if h <= w else (new_long, s)
        x = _resize(images, hw)
        x = center_crop(x, s, tf.crop_rounding)
    else:
        ratio = max(h / s, w / s)
        hw = (round(h / ratio), round(w / ratio))
        x = _resize(images, hw)
        x = pad_to_square(x, s, tf.fill)
    mean = torch.tensor(tf.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(tf.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def center_crop(x: torch.Tensor, size: int, rounding: str = "floor") -> torch.Tensor:
    """Centre-crop [..., H, W] to [..., size, size] (inputs are at least ``size`` on both sides)."""
    h, w = x.shape[-2:]
    if rounding == "floor":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def pad_to_square(x: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """Pad [..., h, w] (h, w <= size) symmetrically to [..., size, size], extra pixel right/bottom (open_clip)."""
    h, w = x.shape[-2:]
    left, top = (size - w) // 2, (size - h) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top), value=fill)


def transform_from_hf_processor(image_processor: Any) -> ImageTransform:
    """Read size, crop size, mean and std from a transformers CLIP image processor.

    Args:
        image_processor: A ``CLIPImageProcessor`` (or ``processor.image_processor``).

    Returns:
        The equivalent ``shortest`` :class:`ImageTransform`.
    """
    cfg = image_processor.to_dict() if hasattr(image_processor, "to_dict") else dict(image_processor)
    size = cfg.get("size") or {}
    crop = cfg.get("crop_size") or {}
    shortest = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    crop_side = crop.get("height", shortest) if isinstance(crop, dict) else crop
    if shortest != crop_side:
        raise ValueError(
            f"processor resizes to {shortest} but crops {crop_side}; mmalign's tensor transform assumes equal sizes"
        )
    return ImageTransform(
        size=int(shortest),
        resize_mode="shortest",
        mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
        crop_rounding="floor",
    )


def transform_from_open_clip(model: Any, resize_mode: str | None = None) -> ImageTransform:
    """Read the preprocess config of an open_clip model (``model.visual.preprocess_cfg``).

    Args:
        model: An open_clip ``CLIP`` model.
        resize_mode: Override the model's resize mode (HPSv2 uses ``longest``).
    """
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ImageTransform(
        size=int(size),
        resize_mode=resize_mode or cfg.get("resize_mode", "shortest"),
        mean=tuple(cfg.get("mean", OPENAI_CLIP_MEAN)),
        std=tuple(cfg.get("std", OPENAI_CLIP_STD)),
        crop_rounding="round",
        fill=float(cfg.get("fill_color", 0)) / 255.0,
    )


def as_tensor(output: Any) -> torch.Tensor:
    """Unwrap ``get_image_features`` / ``get_text_features`` output (transformers 4.x tensor or 5.x object).

    transformers 5 returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` is the projected
    embedding; 4.x returned the tensor itself.
    """
    if isinstance(output, torch.Tensor):
        return output
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find an embedding tensor in {type(output).__name__}")


def video_to_frames(media: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Flatten videos [B,T,3,H,W] to frames [B*T,3,H,W]; images pass through with T=1.

    Returns:
        (frames, T).
    """
    if media.ndim == 5:
        b, t = media.shape[:2]
        return media.reshape(b * t, *media.shape[2:]), t
    if media.ndim == 4:
        return media, 1
    raise ValueError(f"expected images [B,3,H,W] or videos [B,T,3,H,W], got shape {tuple(media.shape)}")
