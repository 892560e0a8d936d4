"""data.shuffle=false trains on pairs in file order (a `label --strategy curriculum` manifest: easy first)."""

from __future__ import annotations

import torch

import mmalign.data.setup as setup


def test_shuffle_false_keeps_the_manifest_order(tiny_sd15, pair_manifest, tmp_path, monkeypatch):
    from mmalign.trainers import load_config
    from mmalign.trainers.loop import train

    seen = []
    original = setup.prepare_pair_batch

    def recording(raw, *args, **kwargs):
        seen.append([i.rsplit(":", 1)[1] for i in raw["item_id"]])
        return original(raw, *args, **kwargs)

    monkeypatch.setattr(setup, "prepare_pair_batch", recording)
    common = [
        f"model.pretrained={tiny_sd15}",
        "model.resolution=16",
        f"data.source={pair_manifest}",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.report_to=none",
        "train.progress=false",
        "train.checkpoint_every=0",
        "lora.rank=2",
        "data.cache=false",
        "data.random_flip=false",
    ]
    torch.manual_seed(0)
    train(
        load_config(
            None, [*common, f"train.output_dir={tmp_path / 'a'}", "data.shuffle=false", "train.seed=3"]
        )
    )
    assert seen == [["1", "2"], ["3", "4"]]  # manifest lines in order
    seen.clear()
    train(load_config(None, [*common, f"train.output_dir={tmp_path / 'b'}", "train.seed=3"]))
    assert sorted(sum(seen, [])) == ["1", "2", "3", "4"] and seen != [["1", "2"], ["3", "4"]]  # shuffled
