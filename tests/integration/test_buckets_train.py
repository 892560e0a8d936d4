"""Aspect-ratio buckets end to end on a tiny SDXL (issue 12, item 7): batches of one bucket, latents at the
bucket's size, and SDXL time ids (original size, crop, target size) that match each item, on the uncached,
cached and lazily cached paths; then a short training run with buckets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.commands.cache import SingleProcess
from mmalign.data.buckets import BucketBatchSampler
from mmalign.pipelines import load_pipeline, make_adapter
from mmalign.trainers import load_config
from mmalign.trainers.data import image_pairs
from mmalign.trainers.loop import train

SHAPES = [(20, 60), (60, 20), (30, 30)]  # wide, tall, square originals -> buckets (8,24), (24,8), (16,16)


@pytest.fixture(scope="module")
def mixed_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        h, w = SHAPES[i % 3]
        names = []
        for tag in ("w", "l"):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}{tag}.png")
            names.append(f"{i}{tag}.png")
        rows.append({"prompt": f"shape {i % 3}", "chosen": names[0], "rejected": names[1]})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "pairs.jsonl"


def cfg_for(model, manifest, out, *extra):
    return load_config(
        None,
        [
            f"model.pretrained={model}",
            "model.resolution=16",
            f"data.source={manifest}",
            "data.buckets=true",
            "data.bucket_step=8",
            "data.bucket_max_ratio=3",
            f"train.output_dir={out}",
            "train.max_steps=3",
            "train.batch_size=2",
            "train.report_to=none",
            "train.progress=false",
            "train.checkpoint_every=0",
            "lora.rank=2",
            *extra,
        ],
    )


EXPECTED = {(20, 60): (8, 24), (60, 20): (24, 8), (30, 30): (16, 16)}


@pytest.mark.parametrize("mode", ["uncached", "cached", "lazy"])
def test_batches_are_one_bucket_with_matching_time_ids(tiny_sdxl, mixed_manifest, tmp_path, mode):
    extra = {"uncached": ["data.cache=false"], "cached": [], "lazy": ["data.cache_build=lazy"]}[mode]
    cfg = cfg_for(tiny_sdxl, mixed_manifest, tmp_path / "run", *extra)
    pipe, family = load_pipeline(str(tiny_sdxl))
    adapter = make_adapter(pipe, family)
    data = image_pairs(cfg, adapter, SingleProcess())
    sampler = BucketBatchSampler(data.groups, 2, seed=0)
    loader = torch.utils.data.DataLoader(data.dataset, batch_sampler=sampler, collate_fn=data.collate)
    seen = set()
    for raw in loader:
        batch = data.prepare(raw, torch.device("cpu"))
        ids = batch["cond"]["time_ids"]
        bucket = tuple(int(v) for v in ids[0, 4:])
        assert (ids[:, 4:] == ids[0, 4:]).all()  # one bucket per batch
        original = tuple(int(v) for v in ids[0, :2])
        assert EXPECTED[original] == bucket  # the bucket nearest the original's shape
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        assert batch["latents_w"].shape[-2:] == (bucket[0] // factor, bucket[1] // factor)
        if bucket == (8, 24):  # 20x60 covers 8x24 at 8x24 exactly: no crop
            assert ids[0, 2:4].tolist() == [0.0, 0.0]
        if bucket == (16, 16):  # 30x30 -> 16x16: no crop either
            assert ids[0, 2:4].tolist() == [0.0, 0.0]
        seen.add(bucket)
    assert seen == set(EXPECTED.values())


def test_training_with_buckets_runs_and_refuses_square_only_methods(tiny_sdxl, mixed_manifest, tmp_path):
    result = train(cfg_for(tiny_sdxl, mixed_manifest, tmp_path / "run", "train.max_steps=2"))
    assert result.summary["steps"] == 2
    from mmalign.config import ConfigError

    with pytest.raises(ConfigError, match="data.buckets=true: inversion_dpo trains at one size"):
        train(cfg_for(tiny_sdxl, mixed_manifest, tmp_path / "inv", "method.name=inversion_dpo"))
    # refused when the recipe is read (so `mmalign validate` says it too), not after loading the model
    from mmalign.trainers import load_config

    for method in ("self_npo", "dense_dpo"):
        with pytest.raises(ConfigError, match=f"data.buckets=true: {method} trains at one size"):
            load_config(None, [f"method.name={method}", "data.buckets=true"])


def test_bucketed_resume_mid_epoch_is_exact(tiny_sdxl, mixed_manifest, tmp_path):
    """3 one-bucket batches per epoch; stop after 2 (mid-epoch), resume to 4 (into epoch 1): identical weights."""
    from safetensors.torch import load_file

    common = ("train.max_steps=4", "train.checkpoint_every=2", f"data.cache_dir={tmp_path / 'cache'}")
    train(cfg_for(tiny_sdxl, mixed_manifest, tmp_path / "straight", *common))
    train(cfg_for(tiny_sdxl, mixed_manifest, tmp_path / "split", *common, "train.max_steps=2"))
    train(cfg_for(tiny_sdxl, mixed_manifest, tmp_path / "split", *common, "train.resume=latest"))
    final_a = load_file(tmp_path / "straight/checkpoints/checkpoint-4/trainable.safetensors")
    final_b = load_file(tmp_path / "split/checkpoints/checkpoint-4/trainable.safetensors")
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name
