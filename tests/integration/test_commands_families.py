"""generate/eval on a local SDXL directory (family from model_index.json, not assumed SD1.5), hub-id family
detection, and the device/dtype defaults of commands that run a model."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.cli import main
from mmalign.data.manifest import read_manifest


def test_generate_and_eval_a_local_sdxl_directory(tiny_sdxl, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.csv").write_text('prompt,negative_prompt\na red square,blurry\n"a blue, round thing",\n')
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_sdxl),
                "--prompts",
                "p.csv",
                "--n-per-prompt",
                "2",
                "--steps",
                "2",
                "--height",
                "32",
                "--width",
                "48",
                "--device",
                "cpu",
                "--dtype",
                "fp32",
                "--batch-size",
                "2",
                "--out",
                "cands",
            ]
        )
        == 0
    )
    records = read_manifest("cands")
    assert [(r.prompt, r.negative_prompt) for r in records] == [("a red square", "blurry")] * 2 + [
        ("a blue, round thing", "")
    ] * 2
    from PIL import Image

    assert Image.open(records[0].path).size == (48, 32)  # non-square
    assert (
        main(
            [
                "eval",
                "--model-a",
                str(tiny_sdxl),
                "--prompts",
                "cands/manifest.jsonl",
                "--seeds-per-prompt",
                "1",
                "--steps",
                "2",
                "--height",
                "32",
                "--width",
                "32",
                "--reward",
                "brightness",
                "--out",
                "eval",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (
        metrics["n"] == 2 and metrics["win_rate"] == 0.5
    )  # the same model on the same seeds ties everywhere


def test_eval_needs_prompts_and_rewards_for_a_real_model(tiny_sd15, capsys):
    assert main(["eval", "--model-a", str(tiny_sd15), "--reward", "brightness"]) == 2
    assert "--prompts FILE is required" in capsys.readouterr().err


def test_family_detection_for_every_family_and_hub_ids(tmp_path, monkeypatch):
    import diffusers

    from mmalign.pipelines import FAMILIES, detect_family

    for family, spec in FAMILIES.items():
        cls_name = spec.pipeline_class_name
        d = tmp_path / family
        d.mkdir()
        (d / "model_index.json").write_text(json.dumps({"_class_name": cls_name}))
        assert detect_family(str(d)) == family
        monkeypatch.setattr(
            diffusers.DiffusionPipeline,
            "load_config",
            classmethod(lambda cls, name, revision=None, c=cls_name: {"_class_name": c}),
        )
        assert detect_family(f"someone/{family}-model") == family

    def offline(cls, name, revision=None):
        raise OSError("we are offline")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "load_config", classmethod(offline))
    with pytest.raises(ValueError, match="could not be read from the hub"):
        detect_family("someone/missing")


def test_device_and_dtype_defaults():
    from mmalign.pipelines.runtime import resolve_device, resolve_dtype

    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--dtype"):
        resolve_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_a_clip_length_the_vae_would_change_is_refused_before_anything_runs(tmp_path, capsys):
    """Wan and CogVideoX make 4k+1 frames (a causal 4x VAE): diffusers rounds --num-frames 10 to 9 with a warning,
    and the manifest recorded 10. generate, eval and label-video refuse it from the VAE config, before any weight
    is read; a training recipe's method.num_frames is refused by validate and by train."""
    from mmalign.pipelines import check_num_frames
    from mmalign.toy.tiny import build_tiny_cogvideox, build_tiny_wan

    build_tiny_wan(tmp_path / "wan")
    build_tiny_cogvideox(tmp_path / "cog")
    check_num_frames(str(tmp_path / "wan"), "wan", 9)
    check_num_frames(str(tmp_path / "wan"), "wan", None)
    with pytest.raises(ValueError, match=r"--num-frames 8: cogvideox clips have 4k\+1 frames .*use 5 or 9"):
        check_num_frames(str(tmp_path / "cog"), "cogvideox", 8)
    (tmp_path / "p.txt").write_text("a red circle\n")
    common = ["--prompts", str(tmp_path / "p.txt"), "--num-frames", "10"]
    assert main(["generate", "--model", str(tmp_path / "wan"), *common, "--out", str(tmp_path / "g")]) == 2
    assert "--num-frames 10: wan clips have 4k+1 frames" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
    assert main(["eval", "--model-a", str(tmp_path / "wan"), *common, "--reward", "flicker"]) == 2
    assert "use 9 or 13" in capsys.readouterr().err
    (tmp_path / "run.yaml").write_text("method:\n  name: dense_dpo\n  num_frames: 10\n")
    assert main(["validate", str(tmp_path / "run.yaml"), f"model.pretrained={tmp_path / 'wan'}"]) == 2
    assert "method.num_frames=10: wan clips have 4k+1 frames" in capsys.readouterr().err
