"""Hybrid/ensemble rewards give the same scores whatever the scoring batch size (normalised over the set or per
prompt, never per batch), and per-prompt normalisation only compares candidates of one prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.rewards.combine import ensemble, hybrid, normalize_groups, rank
from mmalign.rewards.score import collect_items, read_table, score_items


def write_manifest_folder(root, n_prompts=4, per_prompt=12):
    """48 images: per prompt, squares whose redness and brightness vary; a generate-style manifest.jsonl."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    rows = []
    for p in range(n_prompts):
        for i in range(per_prompt):
            arr = np.full((12, 12, 3), rng.integers(40, 200), np.uint8)
            arr[3:9, 3:9] = rng.integers(0, 255, 3)
            name = f"{p * per_prompt + i:05d}.png"
            Image.fromarray(arr).save(root / name)
            rows.append({"path": name, "prompt": f"a red square number {p}", "seed": i, "kind": "image"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("over", ["prompt", "set"])
@pytest.mark.parametrize("normalizer", ["rank", "minmax", "zscore"])
def test_scores_identical_for_batch_sizes_1_5_16(tmp_path, over, normalizer):
    folder = write_manifest_folder(tmp_path / "cands")
    items = collect_items(folder)
    results = {}
    for bs in (1, 5, 16):
        rewards = {
            "h": hybrid(
                [{"name": "color_match", "normalizer": normalizer}, {"name": "brightness", "weight": 0.5}],
                normalizer=normalizer,
                normalize_over=over,
            ),
            "e": ensemble(
                ["color_match", "saturation", "contrast"],
                aggregate="mean_minus_std",
                normalizer=normalizer,
                normalize_over=over,
            ),
        }
        score_items(items, rewards, tmp_path / f"s{bs}.jsonl", batch_size=bs, progress=False)
        results[bs] = read_table(tmp_path / f"s{bs}.jsonl")
    for col in ("h", "e", "h.color_match/norm", "e.disagreement", "e.saturation/norm"):
        one = [r[col] for r in results[1]]
        assert len(set(one)) > 4, col  # the column carries signal, not a constant
        assert [r[col] for r in results[5]] == one, col
        assert [r[col] for r in results[16]] == one, col


def test_per_prompt_normalisation_is_within_each_group():
    raw = torch.tensor([1.0, 2.0, 3.0, 100.0, 200.0])
    groups = ["a", "a", "a", "b", "b"]
    assert normalize_groups(rank, raw, groups).tolist() == [0.0, 0.5, 1.0, 0.0, 1.0]
    assert normalize_groups(rank, raw, None).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_score_default_is_per_prompt_and_config_can_say_set(tmp_path):
    folder = write_manifest_folder(tmp_path / "cands", n_prompts=2, per_prompt=5)
    items = collect_items(folder)
    spec = {"name": "brightness", "normalizer": "rank"}
    score_items(items, {"h": hybrid([spec])}, tmp_path / "p.jsonl", batch_size=3, progress=False)
    per_prompt = read_table(tmp_path / "p.jsonl")
    for prompt in {r["prompt"] for r in per_prompt}:  # ranks 0, .25, .5, .75, 1 inside each prompt
        assert sorted(r["h"] for r in per_prompt if r["prompt"] == prompt) == [0.0, 0.25, 0.5, 0.75, 1.0]
    cfg = tmp_path / "r.yaml"
    cfg.write_text("combine: hybrid\nnormalize_over: set\nnormalizer: rank\nrewards: [{name: brightness}]\n")
    from mmalign.rewards.score import load_reward_config

    score_items(items, load_reward_config(cfg), tmp_path / "s.jsonl", batch_size=3, progress=False)
    whole = sorted(r["hybrid"] for r in read_table(tmp_path / "s.jsonl"))
    assert whole == pytest.approx([i / 9 for i in range(10)])
    cfg.write_text("combine: hybrid\nnormalize_over: batch\nrewards: [{name: brightness}]\n")
    with pytest.raises(ValueError, match="normalize_over='batch'"):
        load_reward_config(cfg)


def test_resumed_run_combines_over_all_rows(tmp_path):
    folder = write_manifest_folder(tmp_path / "cands", n_prompts=2, per_prompt=6)
    items = collect_items(folder)
    reward = {"h": hybrid([{"name": "brightness", "normalizer": "zscore"}])}
    score_items(items, reward, tmp_path / "clean.jsonl", batch_size=4, progress=False)

    def stop(batches):
        if batches == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_items(items, reward, tmp_path / "r.jsonl", batch_size=4, progress=False, on_batch=stop)
    summary = score_items(items, reward, tmp_path / "r.jsonl", batch_size=4, progress=False)
    assert summary.skipped == 8 and summary.scored == 4
    assert [r["h"] for r in read_table(tmp_path / "r.jsonl")] == [
        r["h"] for r in read_table(tmp_path / "clean.jsonl")
    ]


def test_decoding_in_worker_processes_changes_no_row(tmp_path):
    """score_items(num_workers=2) decodes in DataLoader workers; rows (scores, errors, order) equal num_workers=0."""
    folder = write_manifest_folder(tmp_path / "cands", n_prompts=2, per_prompt=6)
    (folder / "00003.png").write_bytes(b"not a png")  # an unreadable file: an error row either way
    items = collect_items(folder)
    rows = {}
    for workers in (0, 2):
        rewards = {
            "h": hybrid(
                [{"name": "color_match"}, {"name": "brightness", "weight": 0.5}], normalize_over="set"
            )
        }
        out = tmp_path / f"w{workers}.jsonl"
        score_items(items, rewards, out, batch_size=5, progress=False, num_workers=workers)
        rows[workers] = read_table(out)
    assert len(rows[0]) == 12 and sum(bool(r.get("error")) for r in rows[0]) == 1
    assert rows[2] == rows[0]
