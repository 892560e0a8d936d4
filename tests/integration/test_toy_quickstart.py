"""The toy workflow's plumbing on a smoke-built toy pipeline: CLI render/sample/eval and a mini quickstart."""

import json
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.toy.build import toy_build


@pytest.fixture(scope="module")
def smoke_toy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy-sd")
    toy_build(out, vae_steps=3, unet_steps=3, num_images=64, log=lambda s: None)
    return out


def test_cli_render_and_sample(smoke_toy, tmp_path, capsys):
    assert main(["toy", "render", "--out", str(tmp_path / "r.png"), "--n", "4", "--p-speckle", "0.5"]) == 0
    assert main(["toy", "render", "--out", str(tmp_path / "v.png"), "--n", "2", "--video", "--flicker"]) == 0
    assert (tmp_path / "r.png").is_file() and (tmp_path / "v.png").is_file()
    capsys.readouterr()
    code = main(
        [
            "toy",
            "sample",
            "--model",
            str(smoke_toy),
            "--n",
            "4",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "s.png"),
        ]
    )
    assert code == 0
    stats = json.loads(capsys.readouterr().out.splitlines()[0])
    assert {"color_correct", "color_match", "defect_rate", "shape_match"} <= set(stats)


def test_cli_eval_same_model_is_a_tie(smoke_toy, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "eval"
    args = [
        "eval",
        "--model-a",
        str(smoke_toy),
        "--prompts",
        str(prompts),
        "--seeds-per-prompt",
        "2",
        "--steps",
        "2",
        "--reward",
        "toy_color",
        "--reward",
        "toy_defect",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["win_rate"] == 0.5 and metrics["primary"] == "toy_color"
    assert set(metrics["mean_reward_a"]) == {"toy_color", "toy_defect"}
    assert (out / "grid.png").is_file() and (out / "table.md").is_file()


@pytest.mark.slow
def test_mini_quickstart_writes_the_report(smoke_toy, tmp_path):
    from mmalign.toy.quickstart import FLAWS, QuickstartOptions, quickstart

    opts = QuickstartOptions(
        candidates=2, train_prompts=8, eval_prompts=2, eval_seeds_per_prompt=2, min_margin=0.0
    )
    metrics = quickstart(
        tmp_path,
        model=smoke_toy,
        overrides=["train.max_steps=2", "train.batch_size=4", "train.progress=false"],
        options=opts,
        log=lambda s: None,
    )
    for name in (
        "report.md",
        "metrics.json",
        "before.png",
        "after.png",
        "before_after.png",
        "training_curves.png",
        "pairs.jsonl",
    ):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["n"] == 4 and saved["steps"] == 2 and saved["primary"] == "training_reward"
    assert "toy_shape (not trained on)" in saved["mean_reward_a"]
    assert set(saved["flaws"]) == set(FLAWS)
    assert all(0 <= f["rate_a"] <= 1 and 0 <= f["rate_b"] <= 1 for f in saved["flaws"].values())
    assert "| either flaw |" in (tmp_path / "report.md").read_text()
    assert 0 <= metrics["win_rate_ci"][0] <= metrics["win_rate"] <= metrics["win_rate_ci"][1] <= 1

    # resumed (train.resume=latest, as an interrupted run says): the same pairs, no candidates sampled again
    logs = []
    pairs = (tmp_path / "pairs.jsonl").read_text()
    resumed = quickstart(
        tmp_path,
        model=smoke_toy,
        overrides=["train.max_steps=3", "train.batch_size=4", "train.progress=false", "train.resume=latest"],
        options=opts,
        log=logs.append,
    )
    assert resumed["steps"] == 3 and (tmp_path / "pairs.jsonl").read_text() == pairs
    assert any(line.startswith("1-3/5 resuming") for line in logs) and not any(
        "generating" in x for x in logs
    )


def test_cli_eval_npo_guidance_on_vs_off(smoke_toy, tmp_path, capsys):
    """`mmalign eval --negative-lora-a`: A = B with a negative LoRA in its CFG branch (guidance on vs off)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(smoke_toy)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a negative model far from the base, so guided samples must differ
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "neg", unet_lora_layers=get_peft_model_state_dict(pipe.unet)
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "eval"
    args = [
        "eval",
        "--model-a",
        str(smoke_toy),
        "--negative-lora-a",
        str(tmp_path / "neg"),
        "--guidance",
        "3",
        "--prompts",
        str(prompts),
        "--seeds-per-prompt",
        "2",
        "--steps",
        "2",
        "--reward",
        "toy_color",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["labels"]["a"] == "NPO-guided (neg)"
    from mmalign.commands.eval import _run_name

    assert _run_name("outputs/sdxl-self-npo/final") == "sdxl-self-npo"  # a run's export: named by its run
    assert metrics["mean_reward_a"]["toy_color"] != metrics["mean_reward_b"]["toy_color"]
    # without CFG NPO guidance would do nothing: one line says so (the toy world samples at CFG 1 by default)
    no_cfg = [a for a in args if a not in ("--guidance", "3")]
    assert main(no_cfg) == 2
    assert "--negative-lora-a acts through classifier-free guidance" in capsys.readouterr().err
    gen = ["generate", "--model", str(smoke_toy), "--prompt", "a red circle", "--guidance", "1"]
    assert main([*gen, "--negative-lora", str(tmp_path / "neg"), "--out", str(tmp_path / "gen")]) == 2
    assert "--negative-lora acts through classifier-free guidance" in capsys.readouterr().err


def test_quickstart_refuses_a_model_outside_the_toy_world_at_once(tiny_sd15, tmp_path, capsys):
    """Its prompts and rewards are the toy world's: another model made 0 pairs and failed minutes later, at training."""
    from mmalign.cli import main

    assert main(["quickstart", "--model", str(tiny_sd15), "--out", str(tmp_path / "qs")]) == 2
    assert "is not a toy-world pipeline" in capsys.readouterr().err and not (tmp_path / "qs").exists()
