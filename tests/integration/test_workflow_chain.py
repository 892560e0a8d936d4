"""The documented workflow on the shipped toy pipelines, run from a directory outside the repository:
generate --prompts -> score -> label -> train -> eval (images), and generate -> score -> label -> eval (video)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmalign.cli import main
from mmalign.data.manifest import read_manifest
from mmalign.rewards.score import read_table

TOY = Path(__file__).resolve().parents[2] / "mmalign" / "toy" / "assets"
CONFIGS = Path(__file__).resolve().parents[2] / "mmalign" / "configs"


def check_pairs_share_prompts(pairs_file: Path, manifest: Path) -> list[dict]:
    prompt_of = {Path(r.path).resolve(): r.prompt for r in read_manifest(manifest)}
    pairs = read_table(pairs_file)
    assert pairs
    for pair in pairs:
        chosen = (pairs_file.parent / pair["chosen"]).resolve()
        rejected = (pairs_file.parent / pair["rejected"]).resolve()
        assert prompt_of[chosen] == prompt_of[rejected] == pair["prompt"]
    return pairs


def check_eval_report(out: Path, tile: int, label_a: str, label_b: str) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == {"a": label_a, "b": label_b} and 0.0 <= metrics["win_rate"] <= 1.0
    assert f"win rate {label_a} vs {label_b}" in (out / "table.md").read_text()
    grid = Image.open(out / "grid.png")
    assert grid.height > 2 * 4 * tile  # two rows upscaled at least 4x, plus title and caption lines
    return metrics


def test_image_chain_from_outside_the_repo(tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("a red circle\na blue square\n")
    Path("reward.yaml").write_text(
        "combine: hybrid\nnormalizer: rank\nrewards:\n  - {name: toy_color_mean}\n  - {name: toy_defect, weight: 0.5}\n"
    )
    assert (
        main(
            [
                "generate",
                "--model",
                str(TOY / "toy-sd"),
                "--prompts",
                "prompts.txt",
                "--n-per-prompt",
                "3",
                "--steps",
                "3",
                "--guidance",
                "2",
                "--batch-size",
                "3",
                "--out",
                "cands",
            ]
        )
        == 0
    )
    assert Path("cands_grid.png").is_file() and not list(Path("cands").glob("*grid*"))
    records = read_manifest("cands")
    assert [r.prompt for r in records] == ["a red circle"] * 3 + ["a blue square"] * 3
    assert [r.seed for r in records] == list(range(6)) and all(r.kind == "image" for r in records)

    assert (
        main(
            [
                "score",
                "cands",
                "--reward",
                "reward.yaml",
                "--out",
                "scores.jsonl",
                "--quiet",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    rows = read_table(Path("scores.jsonl"))
    assert len(rows) == 6 and all(r["prompt"] and "hybrid" in r for r in rows)
    for prompt in ("a red circle", "a blue square"):  # rank-normalised within each prompt's three candidates
        ranks = sorted(r["hybrid.toy_color_mean/norm"] for r in rows if r["prompt"] == prompt)
        assert ranks == [0.0, 0.5, 1.0]

    assert (
        main(
            [
                "label",
                "--scores",
                "scores.jsonl",
                "--key",
                "hybrid",
                "--strategy",
                "margin",
                "--out",
                "pairs.jsonl",
            ]
        )
        == 0
    )
    check_pairs_share_prompts(Path("pairs.jsonl"), Path("cands/manifest.jsonl"))

    assert (
        main(
            [
                "train",
                "configs/toy/quickstart.yaml",
                "data.source=pairs.jsonl",
                "train.output_dir=run",
                "train.max_steps=2",
                "train.batch_size=2",
                "train.progress=false",
                "data.cache=false",
            ]
        )
        == 0
    )
    assert (Path("run/final") / "pytorch_lora_weights.safetensors").is_file()

    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--lora-a",
                "run/final",
                "--prompts",
                "prompts.txt",
                "--seeds-per-prompt",
                "1",
                "--steps",
                "2",
                "--reward",
                "toy_color_mean",
                "--reward",
                "toy_defect",
                "--out",
                "eval",
            ]
        )
        == 0
    )
    shared = check_eval_report(Path("eval"), 32, "tuned", "base")
    assert "| toy_color_mean (primary) |" in capsys.readouterr().out
    # eval loads one pipeline and switches the LoRA off for the base; two separate pipelines agree exactly
    from mmalign.commands.eval import evaluate

    separate = evaluate(
        str(TOY / "toy-sd"),
        model_b=str(TOY / "toy-sd") + "/",  # another name for the same model: loaded on its own
        lora_a="run/final",
        prompts="prompts.txt",
        rewards=["toy_color_mean", "toy_defect"],
        seeds_per_prompt=1,
        steps=2,
        out="eval-separate",
        progress=False,
    )
    assert separate["mean_reward_a"] == shared["mean_reward_a"]
    assert separate["mean_reward_b"] == shared["mean_reward_b"]
    assert shared["mean_reward_a"] != shared["mean_reward_b"]  # and the LoRA did change the samples


def test_video_chain_from_outside_the_repo(tmp_path, monkeypatch):
    pytest.importorskip("av")
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    Path("prompts.jsonl").write_text(
        '{"prompt": "a red circle"}\n{"prompt": "a green square", "group": "g2"}\n'
    )
    assert (
        main(
            [
                "generate",
                "--model",
                str(TOY / "toy-video"),
                "--prompts",
                "prompts.jsonl",
                "--n-per-prompt",
                "2",
                "--num-frames",
                "8",
                "--steps",
                "1",
                "--guidance",
                "2",
                "--batch-size",
                "2",
                "--out",
                "clips",
            ]
        )
        == 0
    )
    records = read_manifest("clips")
    assert all(r.kind == "video" and r.path.endswith(".mp4") for r in records) and records[2].group == "g2"
    assert Image.open("clips_grid.png").width >= 4 * 32  # first-frame contact sheet

    Path("rewards.yaml").write_text(
        "rewards: [toy_color_mean, {name: toy_flicker, kwargs: {per_segment: true}}]\n"
    )
    assert (
        main(
            [
                "score",
                "clips",
                "--reward",
                "rewards.yaml",
                "--video-frames",
                "8",
                "--out",
                "scores.jsonl",
                "--quiet",
            ]
        )
        == 0
    )
    rows = read_table(Path("scores.jsonl"))
    assert len(rows) == 4 and all(len(r["toy_flicker"]) == 4 for r in rows)  # 8 decoded frames, 4 segments
    assert main(["label", "--scores", "scores.jsonl", "--key", "toy_color_mean", "--out", "pairs.jsonl"]) == 0
    pairs = check_pairs_share_prompts(Path("pairs.jsonl"), Path("clips/manifest.jsonl"))
    assert len(pairs) == 2 and {p.get("group") for p in pairs} == {None, "g2"}

    assert (
        main(
            [
                "eval",
                "--model-a",
                str(TOY / "toy-video"),
                "--prompts",
                "prompts.jsonl",
                "--seeds-per-prompt",
                "1",
                "--steps",
                "1",
                "--num-frames",
                "8",
                "--reward",
                "toy_color_mean",
                "--reward",
                str(CONFIGS / "rewards" / "video_rules.yaml"),  # per-second segments: needs the clips' fps
                "--label-b",
                "base",
                "--label-a",
                "same model",
                "--out",
                "eval",
            ]
        )
        == 0
    )
    metrics = check_eval_report(Path("eval"), 32, "same model", "base")
    assert (
        metrics["kind"] == "video" and metrics["win_rate"] == 0.5
    )  # the same model on the same seeds: all ties
    assert metrics["fps"] == 8.0 and {"flicker", "duration"} <= set(
        metrics["rewards"]
    )  # the toy family's fps
