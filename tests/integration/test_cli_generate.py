"""`mmalign generate`: samples from a pipeline directory, with a LoRA from `mmalign train`."""

import torch
from PIL import Image

from mmalign.cli import main
from mmalign.trainers import load_config
from mmalign.trainers.loop import train


def test_generate_with_and_without_a_trained_lora(tiny_sd15, pair_manifest, tmp_path):
    torch.set_num_threads(1)
    cfg = load_config(
        None,
        [
            f"model.pretrained={tiny_sd15}",
            "model.resolution=16",
            f"data.source={pair_manifest}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.report_to=none",
            "train.progress=false",
            "train.learning_rate=5e-2",
            "train.scale_lr=false",
            "lora.rank=2",
        ],
    )
    lora = train(cfg).summary["export"]
    common = [
        "generate",
        "--model",
        str(tiny_sd15),
        "--prompt",
        "a red square",
        "--n",
        "2",
        "--steps",
        "2",
        "--height",
        "16",
        "--width",
        "16",
    ]
    assert main([*common, "--out", str(tmp_path / "base")]) == 0
    assert main([*common, "--lora", lora, "--out", str(tmp_path / "tuned")]) == 0
    base = torch.tensor(list(Image.open(tmp_path / "base/00000.png").getdata()), dtype=torch.float32)
    tuned = torch.tensor(list(Image.open(tmp_path / "tuned/00000.png").getdata()), dtype=torch.float32)
    assert (
        base.shape == tuned.shape and (tmp_path / "base_grid.png").is_file()
    )  # the sheet is outside the media
    assert not (tmp_path / "base/grid.png").exists()
    assert not torch.equal(base, tuned)  # same seed, the LoRA changed the sample


def test_an_interrupted_generate_resumes_where_it_stopped(tiny_sd15, tmp_path, monkeypatch, capsys):
    """Files are written batch by batch; a rerun samples only what is missing and gives the uninterrupted result."""
    import json

    import mmalign.commands.generate as generate_cmd
    import mmalign.pipelines.runtime as runtime

    torch.set_num_threads(1)
    sampled = []
    real_iter = runtime.iter_samples

    def counting(pipe, prompts, seeds, **kwargs):
        for first, media in real_iter(pipe, prompts, seeds, **kwargs):
            sampled.extend(seeds[first : first + len(media)])
            yield first, media

    monkeypatch.setattr(runtime, "iter_samples", counting)
    args = ["generate", "--model", str(tiny_sd15), "--prompt", "a red square", "--prompt", "a blue circle"]
    args += ["--n", "3", "--steps", "2", "--height", "16", "--width", "16", "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = tmp_path / "whole"

    real_write, written = generate_cmd.write_media, []

    def dies_on_the_fourth_file(path, media, fps):
        if len(written) == 3:
            raise RuntimeError("killed")
        written.append(path.name)
        return real_write(path, media, fps)

    monkeypatch.setattr(generate_cmd, "write_media", dies_on_the_fourth_file)
    out = tmp_path / "cut"
    assert main([*args, "--out", str(out)]) == 3  # the crash: a traceback log, exit 3
    assert not (out / "manifest.jsonl").exists()  # no manifest claims files that were never written
    assert len((out / "manifest.jsonl.partial").read_text().splitlines()) == 2  # the first whole batch
    assert main(["score", str(out), "--reward", "brightness", "--out", str(tmp_path / "s.jsonl")]) == 2
    assert "has not finished writing this folder" in capsys.readouterr().err  # not scored as a bare folder

    monkeypatch.setattr(generate_cmd, "write_media", real_write)
    sampled.clear()
    assert main([*args, "--out", str(out)]) == 0
    assert sampled == [2, 3, 4, 5]  # seeds 0 and 1 were kept
    assert not (out / "manifest.jsonl.partial").exists()
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert rows == [json.loads(line) for line in (whole / "manifest.jsonl").read_text().splitlines()]
    assert (
        rows[0]["height"] == 16 and rows[0]["width"] == 16
    )  # the settings that shaped the file are recorded
    for row in rows:
        assert (out / row["path"]).read_bytes() == (whole / row["path"]).read_bytes()

    def must_not_load(*a, **k):
        raise AssertionError("loaded the model with nothing to sample")

    monkeypatch.setattr(runtime, "load_for_inference", must_not_load)
    sampled.clear()
    assert (
        main([*args, "--out", str(out)]) == 0 and sampled == []
    )  # finished: nothing to sample, nothing loaded
    monkeypatch.undo()
    monkeypatch.setattr(runtime, "iter_samples", counting)
    capsys.readouterr()
    assert main([*args, "--guidance", "3", "--out", str(out)]) == 0 and sampled == [0, 1, 2, 3, 4, 5]
    assert "holds samples this run does not keep" in capsys.readouterr().out  # not replaced silently
    sampled.clear()
    assert main([*args, "--guidance", "3", "--overwrite", "--out", str(out)]) == 0 and len(sampled) == 6


def test_generate_without_a_video_writer_fails_before_sampling(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    import mmalign.data.video as video
    import mmalign.pipelines.runtime as runtime

    def no_pyav():
        raise ImportError("writing videos needs PyAV: pip install 'mmalign[video]'")

    def must_not_sample(*args, **kwargs):
        raise AssertionError("sampled before checking the writer")

    monkeypatch.setattr(video, "video_writer", no_pyav)
    monkeypatch.setattr(runtime, "iter_samples", must_not_sample)
    toy_video = Path(__file__).resolve().parents[2] / "mmalign" / "toy" / "assets" / "toy-video"
    code = main(
        ["generate", "--model", str(toy_video), "--prompt", "a red circle", "--out", str(tmp_path / "v")]
    )
    assert code == 2 and "writing videos needs PyAV: pip install 'mmalign[video]'" in capsys.readouterr().err


def test_generate_and_eval_load_a_full_fine_tune_from_its_final_folder(tiny_sd15, tmp_path, capsys):
    """--lora / --lora-a take any run's final/: a full fine-tune's unet/ replaces the pipeline's, exactly."""
    import json

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from mmalign.pipelines.runtime import sample

    torch.set_num_threads(1)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    unet.save_pretrained(tmp_path / "run" / "final" / "unet")
    final = str(tmp_path / "run" / "final")
    common = ["--prompt", "a red square", "--steps", "2", "--height", "16", "--width", "16"]
    assert (
        main(["generate", "--model", str(tiny_sd15), "--lora", final, *common, "--out", str(tmp_path / "g")])
        == 0
    )
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, unet=unet.eval())
    expected = sample(pipe, ["a red square"], [0], steps=2, guidance=5.0, height=16, width=16, progress=False)
    got = torch.tensor(list(Image.open(tmp_path / "g/00000.png").getdata()), dtype=torch.float32)
    want = (expected[0].permute(1, 2, 0).reshape(-1, 3) * 255).round()
    assert (got - want).abs().max() <= 1  # PNG rounding

    args = ["eval", "--model-a", str(tiny_sd15), "--lora-a", final, "--prompts", str(tmp_path / "p.txt")]
    (tmp_path / "p.txt").write_text("a red square\n")
    args += [
        "--reward",
        "brightness",
        "--steps",
        "2",
        "--height",
        "16",
        "--width",
        "16",
        "--seeds-per-prompt",
        "2",
    ]
    assert main([*args, "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["mean_reward_a"]["brightness"] != metrics["mean_reward_b"]["brightness"]  # B is the base

    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_sd15),
                "--lora",
                str(tmp_path),
                *common,
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "no LoRA (pytorch_lora_weights.safetensors) and no fine-tuned denoiser" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written

    # trained weights the pipeline has no place for are one line, never dropped silently or a traceback
    unet.save_pretrained(tmp_path / "wan-run" / "final" / "transformer_2")
    bad = ["generate", "--model", str(tiny_sd15), "--lora", str(tmp_path / "wan-run" / "final"), *common]
    assert main([*bad, "--out", str(tmp_path / "y")]) == 2
    assert (
        "cannot load it into this StableDiffusionPipeline: it has no transformer_2" in capsys.readouterr().err
    )
    lora = tmp_path / "lora-run" / "final"
    lora.mkdir(parents=True)
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"not safetensors")
    assert main([*bad[:4], str(lora), *common, "--out", str(tmp_path / "z")]) == 2
    assert f"{lora}: cannot load it into this StableDiffusionPipeline" in capsys.readouterr().err


def test_a_lora_of_another_base_says_which_base_and_what_differs(
    tiny_sd15, tiny_sdxl, pair_manifest, tmp_path, capsys
):
    """An SDXL run's LoRA given to an SD1.5 pipeline: one line naming the base it was trained on (its
    mmalign_config.yaml) and the first weight that does not fit, without diffusers' whole state-dict dump."""
    from test_train_diffusion_dpo import tiny_cfg

    from mmalign.cli import main
    from mmalign.trainers.loop import train

    train(tiny_cfg(tiny_sdxl, pair_manifest, tmp_path / "xl", "train.max_steps=1"))
    (tmp_path / "p.txt").write_text("a red square\n")
    args = ["generate", "--model", str(tiny_sd15), "--lora", str(tmp_path / "xl" / "final"), "--prompts"]
    capsys.readouterr()
    assert main([*args, str(tmp_path / "p.txt"), "--steps", "1", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"(it was trained on {tiny_sdxl}): size mismatch for " in err, err


def test_an_export_on_the_hub_is_named_by_its_repo_id(tmp_path, monkeypatch, capsys):
    """--lora/--lora-a/--negative-lora/--user-adapter take a repo id (what train.push_to_hub uploads), fetched with
    huggingface_hub's snapshot_download; a local folder of that shape stays local; an id that cannot be fetched
    (offline and not cached) is one argparse error."""
    import huggingface_hub
    import pytest

    from mmalign.cli import build_parser

    fetched = tmp_path / "hub-cache" / "me--run"
    fetched.mkdir(parents=True)
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo_id, **kw: str(fetched) if repo_id == "me/run" else real(repo_id, **kw),
    )
    (tmp_path / "runs" / "final").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    gen = ["generate", "--model", "m", "--prompt", "p", "--out", "o"]
    args = build_parser().parse_args(
        [
            *gen,
            "--lora",
            "me/run",
            "--lora",
            "runs/final",
            "--negative-lora",
            "me/run",
            "--user-adapter",
            "me/run",
        ]
    )
    assert args.lora == [str(fetched), "runs/final"]
    assert args.negative_lora == args.user_adapter == str(fetched)
    assert build_parser().parse_args(["eval", "--lora-a", "me/run"]).lora_a == [str(fetched)]

    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([*gen, "--lora", "nobody/nothing"])
    assert stop.value.code == 2
    assert "argument --lora: nobody/nothing: no such folder here, and no hub repo" in capsys.readouterr().err
