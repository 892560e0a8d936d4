"""Image decoding and the reference code's train-time transforms (resize short side, crop, flip)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from mmalign import limits
from mmalign.limits import MediaError

if TYPE_CHECKING:
    import torch


class DataError(ValueError):
    """Bad input data; the message names the file, row and key."""


def open_image(source: str | Path | bytes, *, where: str) -> Image.Image:
    """Decode an image from a path or raw bytes into RGB; errors name ``where`` (row and file).

    Only regular files within :mod:`mmalign.limits` (bytes, declared pixels) are decoded; anything else,
    a decompression bomb included, is a :class:`DataError` (a counted bad item under ``on_bad_item=skip``).
    """
    try:
        with limits.decode_deadline(where):
            img = limits.open_image(source if isinstance(source, (bytes, bytearray)) else Path(source), where)
            img.load()
            return img.convert("RGB")
    except MediaError as err:
        raise DataError(f"{where}: {str(err).removeprefix(where + ': ')}") from None
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        MemoryError,
        Image.DecompressionBombError,
    ) as err:
        raise DataError(f"{where}: cannot decode image: {type(err).__name__}: {str(err)[:200]}") from None


def resized_shape(original_size: tuple[int, int], size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) after the resize of :func:`resize_crop`: the smallest that covers ``size`` at the same aspect.

    For a square ``size`` this is torchvision's short-side resize (long side ``int(size * long / short)``).
    """
    h, w = original_size
    th, tw = (size, size) if isinstance(size, int) else size
    if th / h >= tw / w:  # the height is the binding side
        return th, max(tw, int(th * w / h))
    return max(th, int(tw * h / w)), tw


def resize_crop(
    img: Image.Image,
    size: int | tuple[int, int],
    *,
    random_crop: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize to cover ``size`` (bilinear), crop it, return pixels in [-1, 1].

    Args:
        img: the decoded image.
        size: the square side (the short side is resized to it, as the reference code) or a (height, width)
            bucket (:mod:`mmalign.data.buckets`): the image is resized to cover it and the excess cropped.
        random_crop: a random instead of a centred crop.
        generator: draws the random crop.

    Returns:
        pixels [3,H,W], the original (height, width), and the crop's (top, left) in resized coordinates
        (what SDXL's add_time_ids records).
    """
    import torch
    from torchvision.transforms.functional import InterpolationMode, pil_to_tensor, resize

    original = (img.height, img.width)
    th, tw = (size, size) if isinstance(size, int) else size
    x = pil_to_tensor(img)
    x = resize(
        x, list(resized_shape(original, size)), interpolation=InterpolationMode.BILINEAR, antialias=True
    )
    h, w = x.shape[-2:]
    if random_crop:
        top = int(torch.randint(0, h - th + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - tw + 1, (1,), generator=generator))
    else:
        top, left = (h - th) // 2, (w - tw) // 2
    x = x[:, top : top + th, left : left + tw]
    return x.float().div(127.5).sub(1.0), original, (top, left)


def mirror_crop(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], size: int | tuple[int, int]
) -> tuple[int, int]:
    """The crop's (top, left) after a horizontal flip of the resized image (SDXL's add_time_ids of a flipped item)."""
    _, resized_w = resized_shape(original_size, size)
    tw = size if isinstance(size, int) else size[1]
    top, left = crop_top_left
    return top, resized_w - left - tw
