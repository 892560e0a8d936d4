"""Pictures of results: labelled, upscaled sample grids, first-frame contact sheets and training curves.

Used by ``mmalign generate`` (contact sheet), ``mmalign eval`` (base vs tuned grid with scores) and the training
loop (``write_training_curves`` after a run; validation grids). Small images are upscaled with nearest-neighbour
so a 32 px toy sample is still readable; text is drawn with PIL's default font.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def first_frames(media: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] images unchanged; [N,T,3,H,W] clips -> their first frames [N,3,H,W]."""
    return media[:, 0] if media.dim() == 5 else media


PREVIEW_SIDE = 256  # longest side of a sample kept for a grid or a contact sheet


def previews(media: torch.Tensor, max_side: int = PREVIEW_SIDE) -> torch.Tensor:
    """What a grid shows of each sample, small enough to keep many while the rest streams past: [N,3,h,w] first
    frames (of clips), area-downscaled so the longer side is at most ``max_side``; new tensors, never views that
    would keep a whole batch alive (a 1024 px SDXL image is 12.6 MB as float32, one 81-frame Wan clip 388 MB)."""
    frames = first_frames(media).float()
    h, w = frames.shape[-2:]
    if max(h, w) <= max_side:
        return frames.clone()
    scale = max_side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return torch.nn.functional.interpolate(frames, size=size, mode="area")


def _to_pil(image: torch.Tensor, scale: int):
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def auto_scale(side: int, target: int = 128) -> int:
    """Integer upscaling that brings a ``side``-pixel tile to at least ``target`` pixels (1 for large images)."""
    return max(1, -(-target // max(side, 1)))


def labelled_grid(
    rows: Sequence[torch.Tensor],
    *,
    row_names: Sequence[str] = (),
    column_titles: Sequence[str] = (),
    captions: Sequence[Sequence[str]] = (),
    scale: int | None = None,
    max_tile: int = 256,
):
    """A grid with a name per row, a title per column (e.g. the prompt) and a caption under each tile (scores).

    Args:
        rows: One tensor per row, [N,3,H,W] or clips [N,T,3,H,W] (first frames shown); rows may differ in N.
        row_names: Left label per row ("base", "tuned").
        column_titles: Text above each column.
        captions: Per row, per tile text (e.g. ``"toy_color 0.81"``).
        scale: Upscaling factor; default brings small tiles to >= 128 px.
        max_tile: Larger tiles are downscaled to this side.

    Returns:
        A PIL image.
    """
    from PIL import Image, ImageDraw, ImageFont

    rows = [first_frames(r) for r in rows]
    h, w = rows[0].shape[-2:]
    scale = scale or auto_scale(min(h, w))
    tile_h, tile_w = h * scale, w * scale
    shrink = min(1.0, max_tile / max(tile_h, tile_w))
    tile_h, tile_w = int(tile_h * shrink), int(tile_w * shrink)
    font = ImageFont.load_default()
    line_h = 12
    chars = max(8, tile_w // 6)
    titles = [textwrap.wrap(t, chars)[:3] for t in column_titles]
    title_h = line_h * max((len(t) for t in titles), default=0) + (4 if titles else 0)
    cap_h = line_h * max((len(c.splitlines()) for row in captions for c in row), default=0)
    left = int(max((font.getlength(n) for n in row_names), default=0)) + (8 if row_names else 0)
    ncol = max(len(r) for r in rows)
    pad = 4
    width = left + ncol * (tile_w + pad) + pad
    height = title_h + len(rows) * (tile_h + cap_h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(titles):
        for k, line in enumerate(lines):
            draw.text((left + pad + c * (tile_w + pad), 2 + k * line_h), line, fill="black", font=font)
    for r, row in enumerate(rows):
        top = title_h + pad + r * (tile_h + cap_h + pad)
        if r < len(row_names):
            draw.text((4, top + tile_h // 2 - 6), row_names[r], fill="black", font=font)
        for c in range(len(row)):
            x = left + pad + c * (tile_w + pad)
            tile = _to_pil(row[c].float(), scale)
            if tile.size != (tile_w, tile_h):
                tile = tile.resize((tile_w, tile_h), Image.BILINEAR)
            canvas.paste(tile, (x, top))
            if r < len(captions) and c < len(captions[r]):
                draw.multiline_text((x, top + tile_h + 1), captions[r][c], fill="black", font=font, spacing=0)
    return canvas


def contact_sheet(
    media: torch.Tensor, titles: Sequence[str] = (), *, per_row: int = 8, scale: int | None = None
):
    """First frame (or the image) of each sample, ``per_row`` per row, each titled (e.g. with its prompt)."""
    rows = [media[i : i + per_row] for i in range(0, len(media), per_row)]
    from PIL import Image

    parts = [
        labelled_grid([row], column_titles=list(titles[i * per_row : (i + 1) * per_row]), scale=scale)
        for i, row in enumerate(rows)
    ]
    sheet = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    y = 0
    for p in parts:
        sheet.paste(p, (0, y))
        y += p.height
    return sheet


def write_training_curves(
    history: Sequence[dict[str, Any]],
    path: str | Path,
    keys: Sequence[str] = ("loss", "implicit_acc", "reward_margin"),
) -> Path | None:
    """Plot logged metrics against step (raw, and a moving average) into one PNG; None when nothing was logged.

    Args:
        history: Rows ``{"step": int, "<metric>": float, ...}`` (the loop's ``history.jsonl``).
        path: Output PNG.
        keys: Metrics to plot, those present in the history.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in h for h in history)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(h["step"], float(h[key])) for h in history if key in h]
        steps, values = zip(*points)
        w = max(1, len(values) // 20)
        smooth = [
            sum(values[max(0, i - w + 1) : i + 1]) / len(values[max(0, i - w + 1) : i + 1])
            for i in range(len(values))
        ]
        ax.plot(steps, values, alpha=0.3, color="C0")
        ax.plot(steps, smooth, color="C0")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_validation(
    accelerator: Any, media: torch.Tensor, prompts: Sequence[str], step: int, path: str | Path | None = None
):
    """Save a labelled validation grid (prompt above each sample, step as row name) and send it to the trackers.

    TensorBoard gets the grid image (captions drawn in); wandb gets one ``wandb.Image`` per sample with its prompt
    as caption. Call it at step 0 and every ``validation_every`` steps on the main process.

    Args:
        accelerator: The run's ``accelerate.Accelerator`` (its ``trackers``).
        media: [N,3,H,W] images or [N,T,3,H,W] clips (first frame shown), in [0, 1].
        prompts: One per sample.
        step: Global step.
        path: Where to save the PNG (skipped when None).

    Returns:
        The PIL grid.
    """
    import numpy as np

    grid = labelled_grid([media], row_names=[f"step {step}"], column_titles=list(prompts))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "wandb":
            import wandb

            frames = first_frames(media)
            tracker.log(
                {
                    "validation": [
                        wandb.Image(_to_pil(frames[i].float(), 1), caption=prompts[i])
                        for i in range(len(frames))
                    ]
                },
                step=step,
            )
        elif tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), global_step=step, dataformats="HWC")
    return grid
