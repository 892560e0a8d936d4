"""`mmalign eval` statistics on synthetic score lists."""

import json

import pytest
import torch

from mmalign.toy.evaluate import (
    compare_scores,
    flaw_rates,
    flaw_table,
    markdown_table,
    paired_grid,
    paired_stats,
    score_pair,
    write_eval_report,
)


def test_known_better_model_wins_with_interval_above_half():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(300, generator=g)
    better = base + 0.1 + 0.1 * torch.randn(300, generator=g)  # better on ~84% of pairs
    s = paired_stats(better, base)
    assert s["n"] == 300
    assert 0.75 < s["win_rate"] < 0.92
    lo, hi = s["win_rate_ci"]
    assert 0.5 < lo < s["win_rate"] < hi
    assert s["mean_diff"] == pytest.approx((better - base).mean().item())
    assert s["mean_diff_ci"][0] > 0


def test_identical_models_give_interval_around_half():
    g = torch.Generator().manual_seed(1)
    same = torch.rand(256, generator=g)
    s = paired_stats(same, same.clone())
    assert s["win_rate"] == 0.5 and s["ties"] == 256
    assert s["win_rate_ci"][0] <= 0.5 <= s["win_rate_ci"][1]
    # two draws from one distribution: interval covers 0.5
    other = torch.rand(256, generator=g)
    s = paired_stats(same, other)
    assert s["win_rate_ci"][0] < 0.5 < s["win_rate_ci"][1]


def test_hand_worked_win_rate_with_ties_and_bootstrap_reproducible():
    s = paired_stats([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0])  # win, tie, loss, win
    assert s["win_rate"] == pytest.approx(2.5 / 4)
    assert (s["wins"], s["ties"], s["losses"]) == (2, 1, 1)
    assert s["mean_reward_a"] == pytest.approx(1.5) and s["mean_reward_b"] == pytest.approx(1.25)
    assert paired_stats([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0])["win_rate_ci"] == s["win_rate_ci"]
    with pytest.raises(ValueError, match="same"):
        paired_stats([1.0], [1.0, 2.0])


def test_suite_scores_both_models_in_one_batch_and_reports(tmp_path):
    calls = []

    def batch_zscore(media, prompts):  # a reward that normalises within its batch
        calls.append(len(media))
        x = media.mean(dim=(1, 2, 3))
        return (x - x.mean()) / x.std()

    a = torch.full((6, 3, 8, 8), 0.8)
    b = torch.full((6, 3, 8, 8), 0.2)
    scores = score_pair(
        {"z": batch_zscore, "brightness": lambda m, p: m.mean(dim=(1, 2, 3))}, a, b, ["x"] * 6
    )
    assert calls == [12]
    metrics = compare_scores(scores)
    assert metrics["primary"] == "z" and metrics["win_rate"] == 1.0 and metrics["n"] == 6
    assert metrics["mean_reward_a"]["brightness"] == pytest.approx(0.8)
    assert metrics["mean_reward_b"]["brightness"] == pytest.approx(0.2)
    assert "| z (primary) |" in markdown_table(metrics)
    write_eval_report(metrics, a, b, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert {"win_rate", "win_rate_ci", "n", "mean_reward_a", "mean_reward_b"} <= set(saved)
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "table.md").is_file()


def test_flaw_rates_hand_worked_and_table():
    base = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    tuned = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    f = flaw_rates(tuned, base)
    assert f["rate_b"] == 0.5 and f["rate_a"] == 0.25 and f["drop"] == 0.25
    assert f["fixed"] == 3 and f["broken"] == 1
    assert f["drop_ci"][0] <= 0.25 <= f["drop_ci"][1]
    table = flaw_table({"speckle": f}, "tuned", "base")
    assert "| speckle | 50.0% | 25.0% | +25.0% [" in table and "| 3 / 1 |" in table
    with pytest.raises(ValueError, match="same non-zero length"):
        flaw_rates(tuned, base[:3])


def test_paired_grid_writes_a_caption_row_under_each_tile():
    a, b = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    plain = paired_grid(a, b, n=4, per_row=2, scale=2, prompts=["p"] * 4)
    scored = paired_grid(
        a,
        b,
        n=4,
        per_row=2,
        scale=2,
        prompts=["p"] * 4,
        captions_a=["0.9"] * 4,
        captions_b=["0.1 speckle"] * 4,
    )
    assert scored.size[1] > plain.size[1]  # room for one caption line under each of the 4 rows


def test_quickstart_options_from_items():
    from mmalign.toy.quickstart import QuickstartOptions

    opts = QuickstartOptions.from_items(["guidance_scale=1.0", "candidates=12", "pairing=best_worst"])
    assert (opts.guidance_scale, opts.candidates, opts.pairing) == (1.0, 12, "best_worst")
    assert QuickstartOptions.from_items([]) == QuickstartOptions()
    for bad in ("guidance=1", "candidates"):
        with pytest.raises(ValueError, match=f"bad option '{bad}'.*guidance_scale"):
            QuickstartOptions.from_items([bad])
