"""Scoring decodes 8-bit files to uint8 and makes the float pixels on the reward's side: a quarter of the bytes
through worker processes and to the device, and exactly the scores of decoding to float."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mmalign.rewards.score import (
    collect_items,
    group_media,
    load_media,
    load_media_uint8,
    read_table,
    score_batch,
    score_items,
)


def pixel_sum(media: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A reward that every bit of every pixel changes."""
    assert media.dtype == torch.float32 and 0 <= media.min() and media.max() <= 1
    return media.flatten(1).double().sum(1)


def write_images(root, n=5):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        size = (24, 32) if i % 2 else (32, 32)  # two shapes: two groups
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append(f'{{"path": "{i}.png", "prompt": "p{i % 2}"}}')
    (root / "manifest.jsonl").write_text("\n".join(rows) + "\n")


def test_uint8_loading_scores_exactly_like_float_loading(tmp_path):
    write_images(tmp_path)
    items = collect_items(tmp_path)
    paths = [it.paths["media"] for it in items]
    as_float = score_batch(
        {"s": pixel_sum}, [load_media(p)[0] for p in paths], ["x"] * len(paths), [None] * 5
    )
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.jsonl"
        score_items(
            items, {"s": pixel_sum}, out, batch_size=3, resume=False, progress=False, num_workers=workers
        )
        assert [r["s"] for r in read_table(out)] == [c["s"] for c in as_float]


def test_groups_keep_uint8_and_split_by_shape_and_dtype(tmp_path):
    write_images(tmp_path, n=3)
    media = [load_media_uint8(tmp_path / f"{i}.png")[0] for i in range(3)] + [
        load_media(tmp_path / "0.png")[0]
    ]
    groups = group_media(media, [None] * 4)
    assert [(idx, batch.dtype) for idx, batch, _ in groups] == [
        ([0, 2], torch.uint8),
        ([1], torch.uint8),
        ([3], torch.float32),  # a float loader's media are never mixed into a uint8 batch
    ]
    assert torch.equal(groups[0][1][0].float() / 255, load_media(tmp_path / "0.png")[0])
