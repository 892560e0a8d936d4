"""bench/bench_video_step.py's tiny CPU mode (Wan and CogVideoX shapes), and bench/bench_rewards.py's small mode:
the rows carry the figures the GPU table needs, and the floor arithmetic holds."""

from __future__ import annotations

import pytest
from conftest import load_bench as load


@pytest.mark.parametrize("preset", ["wan-tiny", "cogvideox-tiny"])
def test_tiny_dense_dpo_step_floor_leaves_out_the_recomputed_forward(preset):
    bench = load("bench_video_step")
    plain = bench.run(bench.build_parser().parse_args(["--preset", preset, "--steps", "1", "--warmup", "0"]))
    ckpt = bench.run(
        bench.build_parser().parse_args(
            ["--preset", preset, "--steps", "1", "--warmup", "0", "--gradient-checkpointing"]
        )
    )
    assert plain["method"] == "dense_dpo (dense)" and plain["latent"] == [16, 3, 8, 8]
    # checkpointing recomputes the forward in backward; the floor counts the step's necessary work only
    assert ckpt["step_tflop"] == pytest.approx(plain["step_tflop"], rel=1e-6)
    floor_s = plain["floor_s_per_pair"] * plain["pairs_per_step"]
    assert floor_s == pytest.approx(plain["step_tflop"] / plain["matmul_tflops"], rel=1e-2)
    assert plain["floor_ratio"] == pytest.approx(floor_s / plain["seconds_per_step"], rel=2e-2)
    # a selective policy runs on the video transformers too, against the same floor
    sac = bench.run(
        bench.build_parser().parse_args(
            ["--preset", preset, "--steps", "1", "--warmup", "0", "--gradient-checkpointing"]
            + ["--checkpoint-policy", "save_matmuls"]
        )
    )
    assert sac["checkpoint_policy"] == "save_matmuls" and sac["step_tflop"] == ckpt["step_tflop"]


def test_reward_bench_reports_the_raw_backbone_ceiling(tmp_path):
    bench = load("bench_rewards")
    row = bench.main("--n 8 --batch-size 4 --size 64 --repeats 1 --disk-workers 0".split())
    assert row["raw_backbone_images_per_s"] > 0
    assert row["disk_fraction_of_raw_backbone_workers0"] == pytest.approx(
        row["disk_images_per_s_workers0"] / row["raw_backbone_images_per_s"], rel=2e-2
    )
    assert row["disk_scores_identical_across_workers"]


def test_dense_dpo_bench_base_only_measures_the_base(tmp_path, capsys):
    """``efficacy_dense_dpo.py --base-only``: the base's flicker rate in the eval mode, and its clips as a PNG."""
    import json

    bench = load("efficacy_dense_dpo")
    args = "--base-only --eval-mode t2v --eval-prompts 1 --seeds-per-prompt 2 --sample-steps 2"
    assert bench.main([*args.split(), "--out", str(tmp_path)]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert row["eval_mode"] == "t2v" and row["n"] == 2
    assert 0 <= row["flicker_rate"] <= 1 and 0 <= row["flicker_score"] <= 1
    assert {"travel", "jump_rate", "colour_constant", "color_correct"} <= row.keys()  # coherence_stats
    assert row["noise_correlation"] == 0.0
    assert (tmp_path / "base.png").is_file() and not (tmp_path / "pairs").exists()
    assert bench.main([*args.split(), "--noise-correlation", "0.5", "--out", str(tmp_path / "c")]) == 0
    (mixed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert mixed["noise_correlation"] == 0.5 and mixed["flicker_score"] != row["flicker_score"]
