"""bench/bench_train_step.py's tiny CPU mode: a step runs and its row carries pairs/s, the FLOP floor and the ratio."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_train_step.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_mode_reports_floor_and_ratio(capsys):
    bench = load_bench()
    args = argparse.Namespace(
        preset="tiny",
        device="cpu",
        dtype="fp32",
        resolution=None,
        batch=1,
        steps=1,
        warmup=0,
        rank=2,
        gradient_checkpointing=False,
        profile=False,
        modes=["cached"],
        compile="none",
        compile_mode="default",
        channels_last=True,
        attention_backend="sdpa",
    )
    (row,) = bench.run(args)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed[0] == row
    assert row["steps"] == 1 and row["channels_last"] is True
    assert row["step_tflop"] > 0 and row["matmul_tflops"] > 0
    # floor = counted FLOPs / measured matmul rate; ratio = floor / measured step time
    assert row["floor_s_per_step"] == pytest.approx(row["step_tflop"] / row["matmul_tflops"], rel=1e-2)
    assert row["floor_ratio"] == pytest.approx(row["floor_s_per_step"] / row["seconds_per_step"], rel=1e-2)
    assert row["pairs_per_s"] == pytest.approx(1 / row["seconds_per_step"], rel=1e-2)


def test_flop_count_is_the_denoiser_work():
    """FlopCounterMode on a Linear: 2*in*out per row forward, twice that backward (input and weight grads)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * 8 * 64 * 32
