"""bench/efficacy_levers.py reuses one quickstart run's margin-0.05 pairs: its subsets must be exactly the pairs
``mmalign label``'s pairing builds with ``best_worst`` or a larger margin, in the same order."""

from __future__ import annotations

import random

import pytest
from conftest import load_bench as load_bench_script

from mmalign.rewards.label import make_pairs


def load_bench():
    return load_bench_script("efficacy_levers")


@pytest.fixture()
def candidates():
    rng = random.Random(0)
    return {f"prompt {p}": [(f"c/{p}-{i}.png", rng.random()) for i in range(8)] for p in range(20)} | {
        "all tied": [(f"c/t-{i}.png", 0.5 + 0.001 * i) for i in range(8)]
    }


def test_subsets_match_label_pairing(candidates):
    bench = load_bench()
    rows, _ = make_pairs(candidates, "margin", margin=0.05)
    for margin in (0.05, 0.2, 0.5):
        expected, _ = make_pairs(candidates, "margin", margin=margin)
        assert bench.select_pairs(rows, "all", margin) == expected
        expected_bw, _ = make_pairs(candidates, "best_worst", margin=margin)
        assert bench.select_pairs(rows, "best_worst", margin) == expected_bw
    # a prompt whose best and worst differ by <= 0.05 has no pair in either
    assert all(r["prompt"] != "all tied" for r in bench.select_pairs(rows, "best_worst", 0.05))
    assert len(bench.select_pairs(rows, "best_worst", 0.05)) == 20


def test_export_checkpoint_gives_the_checkpoints_lora(tmp_path):
    """--eval-at evaluates a checkpoint's LoRA: exported from its trainable.safetensors, loaded back through
    ``load_lora_weights``, it computes what the checkpointed model computed."""
    import torch

    from mmalign.toy.quickstart import DEFAULT_CONFIG
    from mmalign.toy.sample import DEFAULT_TOY_MODEL, load_toy_pipeline
    from mmalign.trainers import load_config
    from mmalign.trainers.checkpoint import CHECKPOINT_PREFIX, TRAINABLE_FILE, trainable_state, write_tensors
    from mmalign.trainers.loop import add_lora

    bench = load_bench()
    cfg = load_config(DEFAULT_CONFIG, [f"model.pretrained={DEFAULT_TOY_MODEL}"])
    trained = load_toy_pipeline(DEFAULT_TOY_MODEL).unet
    add_lora(trained, cfg.lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:  # B = 0 at init: give the LoRA an effect to carry over
                p.normal_(std=0.05)
    ckpt = tmp_path / "run" / "checkpoints" / f"{CHECKPOINT_PREFIX}7"
    ckpt.mkdir(parents=True)
    write_tensors(ckpt / TRAINABLE_FILE, trainable_state(trained))

    lora = bench.export_checkpoint(tmp_path / "run", 7, str(DEFAULT_TOY_MODEL), cfg)
    assert lora == tmp_path / "step-7" / "lora"
    loaded = load_toy_pipeline(DEFAULT_TOY_MODEL)
    loaded.load_lora_weights(str(lora))
    base = load_toy_pipeline(DEFAULT_TOY_MODEL).unet
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([500, 20])
    text = torch.randn(2, 8, trained.config.cross_attention_dim)
    with torch.no_grad():
        want = trained(x, t, text).sample
        got = loaded.unet(x, t, text).sample
        plain = base(x, t, text).sample
    assert (
        want - plain
    ).abs().max() > 1e-3  # the LoRA changes the output, so the match below means something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
