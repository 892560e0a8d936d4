"""Pick-a-Pic-layout data stays in Arrow (records read on demand), hub ids go to datasets.load_dataset, and the
latent cache estimates its size before building."""

from __future__ import annotations

import io
import pickle

import pytest
from PIL import Image

from mmalign.data.images import DataError
from mmalign.data.pairs import ArrowPairRecords, PairDataset, is_hub_id, load_pairs


def png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "PNG")
    return buf.getvalue()


def pickapic(n: int = 6):
    import datasets

    return datasets.Dataset.from_dict(
        {
            "caption": [f"p{i}" for i in range(n)],
            "jpg_0": [png("red")] * n,
            "jpg_1": [png("blue")] * n,
            "label_0": [1.0, 0.5, 0.0, 1.0, 0.5, 0.0][:n],
            "user_id": list(range(n)),
        }
    )


def test_arrow_records_hold_an_index_and_read_rows_on_demand(tmp_path):
    pickapic().to_parquet(str(tmp_path / "train-0.parquet"))
    records, counts = load_pairs(tmp_path)
    assert isinstance(records, ArrowPairRecords) and counts == {"rows": 6, "ties_dropped": 2}
    assert records.index.tolist() == [0, 2, 3, 5] and len(records) == 4
    assert [records[i].prompt for i in range(4)] == ["p0", "p2", "p3", "p5"]
    assert records[1].row.endswith("[2]") and records[1].chosen == png("blue")  # label_0 = 0: jpg_1 wins
    again = pickle.loads(pickle.dumps(records))  # DataLoader workers get a copy that reads the same table
    assert again[3].prompt == "p5" and PairDataset(again, 8, random_flip=False)[3]["pixels_w"].shape == (
        3,
        8,
        8,
    )
    limited, _ = load_pairs(tmp_path, max_items=2)
    assert len(limited) == 2


def test_image_feature_keeps_bytes_and_bad_labels_name_the_row(tmp_path):
    import datasets

    ds = pickapic(3).cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())
    records = ArrowPairRecords(ds, "hub")
    assert isinstance(records[0].chosen, bytes)
    bad = pickapic(3).map(lambda r: {"label_0": 0.7 if r["caption"] == "p2" else r["label_0"]})
    with pytest.raises(DataError, match=r"hub\[2\]: label_0=0.7"):
        ArrowPairRecords(bad, "hub")
    with pytest.raises(DataError, match="missing column"):
        ArrowPairRecords(pickapic(3).remove_columns(["label_0"]), "hub")


def test_hub_ids_go_to_load_dataset(monkeypatch, tmp_path):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return pickapic()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)
    assert (
        is_hub_id("yuvalkirstain/pickapic_v2") and not is_hub_id("./data/x") and not is_hub_id("pairs.jsonl")
    )
    records, counts = load_pairs("yuvalkirstain/pickapic_v2", split="validation[:10]")
    assert calls == [("yuvalkirstain/pickapic_v2", None, "validation[:10]")] and len(records) == 4

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load the hub dataset"):
        load_pairs("someone/missing")


def test_cache_size_estimate_and_limit(tiny_sd15, tmp_path):
    from mmalign.data.cache import LatentCache, estimate_pair_bytes
    from mmalign.pipelines import load_pipeline, make_adapter

    sdxl_vae = {"latent_channels": 4, "block_out_channels": [128, 256, 512, 512]}
    assert estimate_pair_bytes(sdxl_vae, 1024, random_flip=True) == 4 * 128 * 128 * 2 * 2 * 2 * 4  # 2.1 MB
    pickapic().to_parquet(str(tmp_path / "train-0.parquet"))
    records, _ = load_pairs(tmp_path)
    pipe, family = load_pipeline(str(tiny_sd15))
    adapter = make_adapter(pipe, family)
    cache = LatentCache(tmp_path / "cache", {"t": 1})
    lines = []
    with pytest.raises(DataError, match="data.cache_max_gb"):
        cache.build(
            records, adapter, resolution=16, random_flip=True, progress=False, max_bytes=10, log=lines.append
        )
    assert "4 of 4 pairs to encode" in lines[0]
    keep, keys, _ = cache.build(
        records, adapter, resolution=16, random_flip=True, progress=False, log=lines.append
    )
    assert [r.prompt for r in keep] == ["p0", "p2", "p3", "p5"] and all(
        r.chosen == "" for r in keep
    )  # no bytes kept
    assert cache.pair(keys[0])["mean_w"].shape[0] == adapter.vae.config.latent_channels
