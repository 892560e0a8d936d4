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
