"""Normalisers, hybrid and ensemble arithmetic on hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.rewards.combine import (
    Affine,
    EnsembleReward,
    HybridComponent,
    HybridReward,
    RunningZScore,
    ensemble,
    hybrid,
    make_normalizer,
    minmax,
    rank,
    zscore,
)


def fixed(values):
    """A reward that returns fixed scores regardless of input."""
    t = torch.tensor(values, dtype=torch.float32)
    return lambda media, prompts: t.clone()


MEDIA = torch.zeros(3, 3, 4, 4)
PROMPTS = ["a", "b", "c"]


def test_zscore_minmax_rank_affine_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0])
    s = math.sqrt(2 / 3)  # population std of 1,2,3
    assert torch.allclose(zscore(x), torch.tensor([-1 / s, 0.0, 1 / s]))
    assert torch.allclose(minmax(torch.tensor([2.0, 4.0, 3.0])), torch.tensor([0.0, 1.0, 0.5]))
    assert torch.allclose(rank(torch.tensor([10.0, 30.0, 20.0, 20.0])), torch.tensor([0.0, 1.0, 0.5, 0.5]))
    assert torch.allclose(Affine(1 / 26, 0.0)(torch.tensor([26.0, 13.0])), torch.tensor([1.0, 0.5]))
    # degenerate batches
    assert torch.equal(zscore(torch.tensor([5.0, 5.0])), torch.zeros(2))
    assert torch.equal(minmax(torch.tensor([5.0, 5.0])), torch.full((2,), 0.5))
    assert torch.equal(rank(torch.tensor([7.0])), torch.tensor([0.5]))


def test_running_zscore_matches_pooled_statistics():
    norm = RunningZScore()
    norm(torch.tensor([1.0, 2.0]))
    out = norm(torch.tensor([3.0, 4.0, 5.0]))
    pooled = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    mean, std = pooled.mean(), pooled.std(unbiased=False)
    assert norm.count == 5 and math.isclose(norm.mean, 3.0)
    assert torch.allclose(out, (torch.tensor([3.0, 4.0, 5.0]) - mean) / std)


def test_make_normalizer_specs():
    assert make_normalizer("zscore") is zscore
    assert isinstance(make_normalizer("running_zscore"), RunningZScore)
    aff = make_normalizer({"name": "affine", "scale": 2, "shift": 1})
    assert torch.equal(aff(torch.tensor([1.0])), torch.tensor([3.0]))
    with pytest.raises(ValueError, match="unknown normalizer"):
        make_normalizer("z-score")


def test_hybrid_weighted_sum_with_soft_and_hard_gates():
    conf = fixed([1.0, 0.25, 0.0])
    comps = [
        HybridComponent("a", fixed([1.0, 2.0, 3.0]), weight=2.0, normalizer=minmax),  # -> 0, .5, 1
        HybridComponent(
            "b", fixed([4.0, 4.0, 8.0]), weight=1.0, normalizer=Affine(0.5), confidence=conf
        ),  # soft
        HybridComponent(
            "c", fixed([1.0, 1.0, 1.0]), weight=3.0, normalizer=Affine(), confidence=conf, gate=0.5
        ),
    ]
    out = HybridReward(comps).components(MEDIA, PROMPTS)
    # a: 2*[0, .5, 1]; b: 1*[1, .25, 0]*[2, 2, 4]; c: 3*[1, 0, 0]*[1, 1, 1]
    expected = torch.tensor([0 + 2 + 3, 1 + 0.5 + 0, 2 + 0 + 0])
    assert torch.allclose(out["total"], expected)
    assert torch.equal(out["b/raw"], torch.tensor([4.0, 4.0, 8.0]))
    assert torch.equal(out["b/norm"], torch.tensor([2.0, 2.0, 4.0]))
    assert torch.equal(out["c/confidence"], torch.tensor([1.0, 0.25, 0.0]))
    assert "a/confidence" not in out


def test_hybrid_factory_uses_rule_confidence_and_registry():
    media = torch.zeros(2, 3, 4, 4)
    media[0, 0] = 1.0  # pure red; second image black
    r = hybrid(
        [
            {"name": "color_match", "gate": 0.5, "normalizer": "none"},
            {"name": "brightness", "weight": 2.0, "normalizer": "none"},
        ]
    )
    out = r.components(media, ["a red circle", "a circle"])  # second prompt names no colour
    assert torch.allclose(out["color_match/raw"], torch.tensor([1.0, 0.0]))
    assert torch.equal(out["color_match/confidence"], torch.tensor([1.0, 0.0]))
    assert torch.allclose(out["total"], torch.tensor([1.0 + 2 * 0.299, 0.0]))


def test_ensemble_aggregates_and_disagreement():
    members = [
        ("m1", fixed([1.0, 0.0, 2.0]), Affine()),
        ("m2", fixed([3.0, 0.0, 2.0]), Affine()),
        ("m3", fixed([2.0, 3.0, 2.0]), Affine()),
    ]
    stacked = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0], [2.0, 3.0, 2.0]])
    std = stacked.std(0, unbiased=False)
    for agg, expected in [
        ("mean", torch.tensor([2.0, 1.0, 2.0])),
        ("median", torch.tensor([2.0, 0.0, 2.0])),
        ("min", torch.tensor([1.0, 0.0, 2.0])),
        ("mean_minus_std", torch.tensor([2.0, 1.0, 2.0]) - 0.5 * std),
    ]:
        out = EnsembleReward(members, agg, lam=0.5).components(MEDIA, PROMPTS)
        assert torch.allclose(out["total"], expected), agg
        assert torch.allclose(out["disagreement"], std)
        assert torch.equal(out["m3/raw"], torch.tensor([2.0, 3.0, 2.0]))
    assert out["disagreement"][2] == 0  # members agree exactly on item 3
    with pytest.raises(ValueError, match="aggregate"):
        EnsembleReward(members, "max")


def test_ensemble_median_of_even_members_and_zscore_default():
    r = EnsembleReward(
        [("a", fixed([0.0, 4.0, 2.0]), Affine()), ("b", fixed([2.0, 0.0, 2.0]), Affine())], "median"
    )
    assert torch.allclose(r(MEDIA, PROMPTS), torch.tensor([1.0, 2.0, 2.0]))
    e = ensemble(["brightness", "contrast"])  # registry members, z-scored by default
    x = torch.rand(4, 3, 8, 8)
    out = e.components(x, [""] * 4)
    assert torch.allclose(out["brightness/norm"], zscore(out["brightness/raw"]))
    assert torch.allclose(out["total"], (out["brightness/norm"] + out["contrast/norm"]) / 2)


def test_hybrid_broadcasts_per_segment_members():
    seg = lambda media, prompts: torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # noqa: E731
    r = HybridReward(
        [
            HybridComponent("seg", seg, normalizer=Affine()),
            HybridComponent("clip", fixed([10.0, 20.0]), normalizer=Affine()),
        ]
    )
    assert torch.equal(r(MEDIA[:2], PROMPTS[:2]), torch.tensor([[11.0, 12.0], [23.0, 24.0]]))


@pytest.mark.parametrize("over", ["prompt", "set", None])
def test_set_scores_batch_by_batch_equal_one_call_on_the_whole_set(over):
    """What ``mmalign eval`` relies on to stream: hybrids and ensembles normalise once over everything added."""
    from mmalign.rewards.score import SetScores

    rewards = {
        "hybrid": hybrid(
            [{"name": "brightness"}, {"name": "color_match", "gate": 0.5, "normalizer": "rank"}],
            normalize_over=over,
        ),
        "ensemble": ensemble(["brightness", "contrast"], normalize_over=over),
        "contrast": lambda media, prompts: media.std(dim=(1, 2, 3)),
    }
    media = torch.rand(7, 3, 8, 8)
    prompts = [
        "a red circle",
        "a blue square",
        "a red circle",
        "a circle",
        "a blue square",
        "a red circle",
        "x",
    ]
    scores = SetScores(rewards)
    for i in range(0, 7, 3):  # batches of 3, 3, 1: a prompt's items fall in different batches
        scores.add(media[i : i + 3], prompts[i : i + 3])
    streamed = scores.result()
    for name, reward in rewards.items():
        whole = reward(media, prompts)
        assert torch.allclose(streamed[name], whole, atol=1e-6), name
    assert not torch.allclose(
        rewards["hybrid"](media[:3], prompts[:3]), streamed["hybrid"][:3]
    )  # normalising per batch would have given other numbers
    with pytest.raises(ValueError, match="2 media but 1 prompts"):
        scores.add(media[:2], prompts[:1])
