"""Reading a user's shots: a JSONL/CSV pair manifest (the training format of :mod:`mmalign.data.pairs`).

A row is ``prompt, chosen, rejected`` or ``prompt, image_0, image_1, label_0`` (Pick-a-Pic: ``caption, jpg_0,
jpg_1``), optionally with ``user`` / ``user_id``. Only labelled, non-tie pairs are shots (PPD filters
``has_label`` and ``are_different``). Image paths are relative to the manifest's folder.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from mmalign.personalize.encoders import Shot
from mmalign.utils import TEXT_ENCODING


class ShotsError(ValueError):
    """A bad shots file or row; the message names the file, the row and the key."""


def _rows(path: Path) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise ShotsError(f"shots file not found: {path}")
    if path.suffix == ".csv":
        with path.open(newline="", encoding=TEXT_ENCODING) as fh:
            return [(f"{path}:{i}", row) for i, row in enumerate(csv.DictReader(fh), start=2)]
    out = []
    for i, line in enumerate(path.read_text(encoding=TEXT_ENCODING).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{i}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise ShotsError(f"{path}:{i}: not valid JSON: {err}") from None
    return out


def row_user(row: dict) -> str | None:
    user = row.get("user", row.get("user_id"))
    return None if user is None or user == "" else str(user)


def _resolve_row(row: dict, where: str, base: Path) -> tuple[str, Path, Path] | None:
    prompt = row.get("prompt", row.get("caption"))
    if prompt is None:
        raise ShotsError(f"{where}: missing column 'prompt'")
    if "chosen" in row or "rejected" in row:
        keys = ("chosen", "rejected")
    else:
        k0 = "image_0" if "image_0" in row else "jpg_0"
        k1 = "image_1" if "image_1" in row else "jpg_1"
        if k0 not in row or k1 not in row or "label_0" not in row:
            raise ShotsError(
                f"{where}: expected columns prompt,chosen,rejected or prompt,image_0,image_1,label_0; got {sorted(row)}"
            )
        label = row["label_0"]
        if label is None or label == "":
            return None  # unlabelled
        try:
            label = float(label)
        except (TypeError, ValueError):
            raise ShotsError(f"{where}: label_0={row['label_0']!r} is not 0, 0.5 or 1") from None
        if label == 0.5:
            return None  # tie: not a shot
        keys = (k0, k1) if label == 1.0 else (k1, k0)
    paths = []
    for key in keys:
        value = row.get(key)
        if value is None or value == "":
            raise ShotsError(f"{where}: missing column '{key}'")
        p = Path(str(value))
        paths.append(p if p.is_absolute() else base / p)
    return str(prompt), paths[0], paths[1]


def read_shots(path: str | Path, *, user: str | None = None, limit: int | None = None) -> list[Shot]:
    """Decode the shots of a manifest (only ``user``'s rows when given; the first ``limit`` usable ones).

    Raises:
        ShotsError: naming the file and row, for a missing column, an unknown user, several users and no
            ``user`` (shots are one person's), or a corrupt image.
    """
    from mmalign.rewards.score import load_media

    path = Path(path)
    rows = _rows(path)
    users = {row_user(r) for _, r in rows}
    known = sorted(u for u in users if u is not None)
    listed = f"{', '.join(known[:10])}{' ...' if len(known) > 10 else ''}"
    if user is not None:
        rows = [(w, r) for w, r in rows if row_user(r) == str(user)]
        if not rows:
            raise ShotsError(f"{path}: unknown user {user!r} (users in the file: {listed})")
    elif (
        len(known) > 1
    ):  # shots are one person's choices: pooling several people's would make a person of none
        raise ShotsError(f"{path} holds the choices of {len(known)} users ({listed}): pick one with --user")
    shots = []
    for where, row in rows:
        resolved = _resolve_row(row, where, path.parent)
        if resolved is None:
            continue
        prompt, pref, disp = resolved
        images = []
        for which, p in (("chosen", pref), ("rejected", disp)):
            try:
                media, _ = load_media(p)
            except ValueError as err:
                raise ShotsError(f"{where} ({which}): {err}") from None
            if media.dim() != 3:
                raise ShotsError(f"{where} ({which}): {p} is a video; shots are images")
            images.append(media)
        shots.append(Shot(prompt, images[0], images[1], where))
        if limit is not None and len(shots) >= limit:
            break
    return shots


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack [3,H,W] images of possibly different sizes, resizing to the first one's size."""
    import torch.nn.functional as F

    h, w = images[0].shape[-2:]
    return torch.stack(
        [
            im
            if im.shape[-2:] == (h, w)
            else F.interpolate(im[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
            for im in images
        ]
    )
