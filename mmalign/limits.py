"""Limits on user-supplied media, checked before anything is read or decoded.

A training run or a scoring job reads files that someone else made. Without limits, ``/dev/zero`` or a FIFO
given as an image hangs or fills memory, and a 100-byte PNG that declares a 100,000 x 100,000 canvas
makes the decoder allocate 30 GB. Every media path goes through :func:`check_media_file` (a regular
file, not larger than a byte limit) and every image through :func:`open_image` (the declared size is
checked against a pixel limit before a single pixel is decoded); video decoders stop at
:data:`MAX_VIDEO_PIXELS` decoded pixels.

Decoding one item is bounded in time as well (:func:`decode_deadline`, ``MMALIGN_DECODE_TIMEOUT`` seconds),
so a file crafted to make a decoder loop becomes a counted bad item instead of a stalled run.

The limits can be raised per run with environment variables (``MMALIGN_MAX_MEDIA_BYTES``,
``MMALIGN_MAX_IMAGE_PIXELS``, ``MMALIGN_MAX_VIDEO_PIXELS``, ``MMALIGN_DECODE_TIMEOUT``). This module sits on the lowest floor
(next to ``config``) so that ``rewards`` and ``data`` share it; it raises :class:`MediaError`, a
``ValueError`` whose message names the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class MediaError(ValueError):
    """A media file that must not be (or cannot be) read; the message names it."""


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


MAX_MEDIA_BYTES = _env_int("MMALIGN_MAX_MEDIA_BYTES", 1 << 30)  # 1 GiB per file (images and videos)
MAX_IMAGE_PIXELS = _env_int("MMALIGN_MAX_IMAGE_PIXELS", 6144 * 6144)  # declared width x height of one image
MAX_VIDEO_PIXELS = _env_int("MMALIGN_MAX_VIDEO_PIXELS", 1 << 27)  # frames x height x width decoded per video
DECODE_TIMEOUT = _env_int(
    "MMALIGN_DECODE_TIMEOUT", 120
)  # seconds to decode one image or video (0 = no limit)


def _name(path: Any) -> str:
    text = str(path)
    return text if len(text) <= 200 else text[:200] + "..."


def check_media_file(path: str | Path, *, max_bytes: int | None = None, where: str | None = None) -> int:
    """Raise :class:`MediaError` unless ``path`` is a regular file of at most ``max_bytes``; return its size.

    Directories, FIFOs, sockets and devices (``/dev/zero``) are refused without being opened, and
    so is an empty file.
    """
    limit = MAX_MEDIA_BYTES if max_bytes is None else max_bytes
    where = where or _name(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MediaError(f"{where}: file not found") from None
    except (OSError, ValueError) as err:  # permission, name too long, NUL in the name
        raise MediaError(f"{where}: cannot read file: {getattr(err, 'strerror', None) or err}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise MediaError(f"{where}: {kind}")
    if st.st_size == 0:
        raise MediaError(f"{where}: empty file")
    if st.st_size > limit:
        raise MediaError(f"{where}: {st.st_size} bytes, over the limit of {limit} (MMALIGN_MAX_MEDIA_BYTES)")
    return st.st_size


def file_digest(path: str | Path, *, max_bytes: int | None = None) -> bytes:
    """SHA-1 of a checked media file, read in 1 MiB blocks (never the whole file in memory)."""
    check_media_file(path, max_bytes=max_bytes)
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise MediaError(f"{_name(path)}: cannot read file: {err.strerror or err}") from None
    return digest.digest()


@contextlib.contextmanager
def decode_deadline(where: str, seconds: float | None = None) -> Iterator[None]:
    """Raise :class:`MediaError` naming ``where`` when the block runs longer than ``seconds``.

    A ``SIGALRM`` interval timer, armed only in a process's main thread on POSIX (the main process and
    every DataLoader worker decode there); elsewhere, or with ``seconds <= 0``, the block runs unbounded.
    The alarm fires between Python bytecodes, so it stops decoders that return to Python between frames
    (PyAV, PIL's incremental loaders); the byte and pixel limits bound what a single C call can do.
    An enclosing deadline is restored afterwards.
    """
    seconds = DECODE_TIMEOUT if seconds is None else seconds
    if (
        seconds <= 0
        or not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise MediaError(f"{where}: decoding took over {seconds:g} s (MMALIGN_DECODE_TIMEOUT)")

    previous = signal.signal(signal.SIGALRM, expired)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:  # an enclosing deadline keeps what was left of its time
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


def check_pixels(width: int, height: int, where: str, *, frames: int = 1, limit: int | None = None) -> None:
    """Raise :class:`MediaError` when ``frames x width x height`` is over the image (or given) pixel limit."""
    limit = (MAX_IMAGE_PIXELS if frames == 1 else MAX_VIDEO_PIXELS) if limit is None else limit
    if width <= 0 or height <= 0:
        raise MediaError(f"{where}: declares an empty size {width}x{height}")
    total = int(frames) * int(width) * int(height)
    if total > limit:
        what = f"{width}x{height}" if frames == 1 else f"{frames} frames of {width}x{height}"
        env = "MMALIGN_MAX_IMAGE_PIXELS" if frames == 1 else "MMALIGN_MAX_VIDEO_PIXELS"
        raise MediaError(
            f"{where}: {what} is {total} pixels, over the limit of {limit} ({env}; a decompression bomb?)"
        )


def open_image(source: str | Path | bytes, where: str | None = None) -> Any:
    """Open an image with PIL after the file and its declared size pass the limits; pixels are not decoded yet.

    Returns:
        A lazily decoding ``PIL.Image.Image`` (call ``load()`` or ``convert()`` inside a try).

    Raises:
        MediaError: not a regular file, too large, or too many declared pixels.
        PIL's own errors for data it cannot read (``UnidentifiedImageError``, ``OSError``, ...).
    """
    from PIL import Image

    if isinstance(source, (bytes, bytearray)):
        where = where or f"<{len(source)} bytes>"
        if len(source) > MAX_MEDIA_BYTES:
            raise MediaError(f"{where}: {len(source)} bytes, over the limit of {MAX_MEDIA_BYTES}")
        fh: Any = io.BytesIO(source)
    else:
        where = where or _name(source)
        check_media_file(source, where=where)
        fh = source
    try:
        img = Image.open(fh)
    except Image.DecompressionBombError as err:  # PIL's own check, at twice its MAX_IMAGE_PIXELS
        raise MediaError(f"{where}: {err}") from None
    check_pixels(img.width, img.height, where)
    frames = getattr(img, "n_frames", 1)  # animated GIF/PNG/WebP: every frame is as large as the canvas
    if frames > 1:
        check_pixels(img.width, img.height, where, frames=frames)
    return img
