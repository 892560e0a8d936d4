"""data.cache_build=lazy: no pass before step 1; a lazily encoded batch equals the eagerly cached one, the
encodings land in shards that a new run reads back, and training runs on it."""

from __future__ import annotations

import math

import torch

from mmalign.data.cache import CachedPairDataset, LatentCache, LazyCachedPairDataset, collate_items
from mmalign.data.pairs import collate_pairs, load_pairs
from mmalign.data.setup import prepare_lazy_batch, prepare_pair_batch


def test_lazy_batch_equals_eager_batch_and_persists(tiny_sd15, pair_manifest, tmp_path):
    from mmalign.pipelines import load_pipeline, make_adapter

    pipe, family = load_pipeline(str(tiny_sd15))
    adapter = make_adapter(pipe, family)
    records, _ = load_pairs(pair_manifest)
    cpu = torch.device("cpu")

    eager = LatentCache(tmp_path / "eager", {"m": 1})
    kept, keys, _ = eager.build(
        records, adapter, resolution=16, random_flip=True, progress=False, log=lambda _: None
    )
    eager_ds = CachedPairDataset(kept, keys, eager, random_flip=False)
    torch.manual_seed(0)
    expected = prepare_pair_batch(
        collate_pairs([eager_ds[i] for i in range(4)]), adapter, eager, 0.0, 16, cpu
    )

    lazy = LatentCache(tmp_path / "lazy", {"m": 1})
    lazy.lazy_shard_size = 4  # one shard as soon as 4 pairs are encoded
    lazy_ds = LazyCachedPairDataset(records, lazy, resolution=16, random_flip=False)
    batch = collate_items([lazy_ds[i] for i in range(4)])
    assert all("pixels_w" in it for it in batch["items"])  # nothing cached yet: decoded in the worker
    torch.manual_seed(0)
    got = prepare_lazy_batch(batch, adapter, lazy, 0.0, 16, cpu)
    torch.testing.assert_close(got["latents_w"], expected["latents_w"])
    torch.testing.assert_close(got["latents_l"], expected["latents_l"])
    for k in expected["cond"]:
        torch.testing.assert_close(got["cond"][k], expected["cond"][k])

    reopened = LatentCache(tmp_path / "lazy", {"m": 1})  # a later run reads the shard back
    assert all(reopened.has_pair(k) for k in keys)
    items = [LazyCachedPairDataset(records, reopened, resolution=16, random_flip=False)[i] for i in range(4)]
    assert all("mean_w" in it and "pixels_w" not in it for it in items)  # served from the cache, no decoding
    torch.manual_seed(0)
    again = prepare_lazy_batch(collate_items(items), adapter, reopened, 0.0, 16, cpu)
    torch.testing.assert_close(again["latents_w"], expected["latents_w"])


def test_training_with_a_lazy_cache(tiny_sd15, pair_manifest, tmp_path):
    from mmalign.trainers import load_config
    from mmalign.trainers.loop import train

    torch.manual_seed(0)
    result = train(
        load_config(
            None,
            [
                f"model.pretrained={tiny_sd15}",
                "model.resolution=16",
                f"data.source={pair_manifest}",
                f"train.output_dir={tmp_path / 'run'}",
                "train.max_steps=2",
                "train.batch_size=2",
                "train.report_to=none",
                "train.progress=false",
                "train.checkpoint_every=0",
                "lora.rank=2",
                "data.cache_build=lazy",
                f"data.cache_dir={tmp_path / 'cache'}",
            ],
        )
    )
    assert result.summary["steps"] == 2 and math.isfinite(result.summary["final_metrics"]["loss"])
    assert list((tmp_path / "cache").rglob("text-*.safetensors"))  # prompts were encoded on first use
    # the 4 pairs encoded on first use reach disk at the end of the run (fewer than a shard's 256: they stayed in
    # memory and were lost before), so the next run reads them instead of encoding them again
    (latent_shard,) = (tmp_path / "cache").rglob("latents-*.safetensors")
    import json

    (index,) = (tmp_path / "cache").rglob("index.json")
    assert len(json.loads(index.read_text())["pairs"]) == 4 and latent_shard.stat().st_size > 0


def test_lazy_sdxl_flips_match_the_eager_cache(tiny_sdxl, pair_manifest, tmp_path):
    from mmalign.pipelines import load_pipeline, make_adapter

    pipe, family = load_pipeline(str(tiny_sdxl))
    adapter = make_adapter(pipe, family)
    records, _ = load_pairs(pair_manifest)
    cpu, fp = torch.device("cpu"), {"resolution": 16}
    eager = LatentCache(tmp_path / "eager", fp)
    kept, keys, _ = eager.build(
        records, adapter, resolution=16, random_flip=True, joint_crop=True, progress=False, log=lambda _: None
    )
    torch.manual_seed(1)  # the same flip draws for both datasets
    eager_items = [CachedPairDataset(kept, keys, eager, random_flip=True)[i] for i in range(4)]
    torch.manual_seed(1)
    lazy = LatentCache(tmp_path / "lazy", fp)
    lazy_items = [LazyCachedPairDataset(records, lazy, resolution=16, joint_crop=True)[i] for i in range(4)]
    assert [it["flip"] for it in lazy_items].count(True) not in (0, 4)  # both orientations are exercised
    torch.manual_seed(0)
    expected = prepare_pair_batch(collate_pairs(eager_items), adapter, eager, 0.0, 16, cpu)
    torch.manual_seed(0)
    got = prepare_lazy_batch(collate_items(lazy_items), adapter, lazy, 0.0, 16, cpu)
    torch.testing.assert_close(got["latents_w"], expected["latents_w"])
    torch.testing.assert_close(got["cond"]["time_ids"], expected["cond"]["time_ids"])  # mirrored crops agree
