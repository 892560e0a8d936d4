"""Image decoding and the reference code's train-time transforms (resize short side, crop, flip)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from mmalign import limits
from mmalign.limits import MediaError


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


def resize_crop(
    img: Image.Image, resolution: int, *, random_crop: bool = False, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize the short side to ``resolution`` (bilinear), crop a square, return pixels in [-1, 1].

    Returns:
        pixels [3,R,R], the original (height, width), and the crop's (top, left) in resized coordinates
        (what SDXL's add_time_ids records).
    """
    from torchvision.transforms.functional import InterpolationMode, pil_to_tensor, resize

    original = (img.height, img.width)
    x = pil_to_tensor(img)
    x = resize(x, resolution, interpolation=InterpolationMode.BILINEAR, antialias=True)
    h, w = x.shape[-2:]
    if random_crop:
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
    else:
        top, left = (h - resolution) // 2, (w - resolution) // 2
    x = x[:, top : top + resolution, left : left + resolution]
    return x.float().div(127.5).sub(1.0), original, (top, left)


def mirror_crop(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], resolution: int
) -> tuple[int, int]:
    """The crop's (top, left) after a horizontal flip of the resized image (SDXL's add_time_ids of a flipped item).

    :func:`resize_crop` resizes the short side to ``resolution`` as torchvision does (long side
    ``int(resolution * long / short)``), so the resized width follows from the original size.
    """
    h, w = original_size
    resized_w = resolution if w <= h else int(resolution * w / h)
    top, left = crop_top_left
    return top, resized_w - left - resolution
