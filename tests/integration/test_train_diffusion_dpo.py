"""Diffusion-DPO training on tiny SD1.5/SDXL pipelines: what trains, what stays frozen, cache, resume, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_only_trainable_changed, card_code, card_commands
from safetensors.torch import load_file

from mmalign.config import ConfigError
from mmalign.data.pairs import PairDataset, collate_pairs, load_pairs
from mmalign.data.setup import prepare_pair_batch
from mmalign.pipelines import load_pipeline, make_adapter
from mmalign.trainers import load_config
from mmalign.trainers.loop import TrainingError, train

torch.set_num_threads(1)


def tiny_cfg(model, manifest, out, *extra):
    return load_config(None, tiny_overrides(model, manifest, out, *extra))


def tiny_overrides(model, manifest, out, *extra) -> list[str]:
    return [
        f"model.pretrained={model}",
        "model.resolution=16",
        f"data.source={manifest}",
        f"train.output_dir={out}",
        "train.max_steps=3",
        "train.batch_size=2",
        "train.report_to=none",
        "train.progress=false",
        "train.learning_rate=1e-3",
        "train.scale_lr=false",
        "train.checkpoint_every=0",
        "lora.rank=2",
        "method.beta=5000",
        *extra,
    ]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_trainable_change_and_frozen_stay(family, lora, request, pair_manifest, tmp_path):
    from diffusers import UNet2DConditionModel

    model = request.getfixturevalue(f"tiny_{family}")
    result = train(
        tiny_cfg(model, pair_manifest, tmp_path / "run", f"lora.enabled={str(lora).lower()}"),
        keep_initial=True,
    )
    pretrained = dict(UNet2DConditionModel.from_pretrained(model, subfolder="unet").named_parameters())
    trainable, frozen = assert_only_trainable_changed(result, pretrained)
    assert trainable > 0 and (frozen > 0) == lora
    if lora:
        assert all("lora" in n for n, p in result.denoiser.named_parameters() if p.requires_grad)
    s = result.summary
    assert (
        s["steps"] == 3
        and math.isfinite(s["final_metrics"]["loss"])
        and 0 <= s["final_metrics"]["implicit_acc"] <= 1
    )
    assert {"delta_w", "delta_l", "model_err_w", "ref_err_l", "reward_margin"} <= set(s["final_metrics"])


def test_exported_lora_loads_into_the_pipeline(tiny_sd15, pair_manifest, tmp_path):
    """The export loads with diffusers, and its model card's lines load it the same way; the card's metadata
    is the Hub's and its config reruns the run."""
    from huggingface_hub import ModelCard

    from mmalign.config import to_dict

    cfg = tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "run", "train.learning_rate=5e-2")
    result = train(cfg)
    pipe, _ = load_pipeline(str(tiny_sd15))

    def sample(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            "a red square",
            num_inference_steps=2,
            height=16,
            width=16,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images

    before = sample(pipe)
    pipe.load_lora_weights(result.summary["export"])
    after = sample(pipe)
    assert not torch.allclose(before, after)

    final = Path(result.summary["export"])
    assert torch.equal(sample(card_code(final)["pipe"]), after)
    card = ModelCard.load(final / "README.md")
    assert card.data.library_name == "diffusers" and card.data.base_model is None  # a local base: no hub id
    assert {"mmalign", "diffusion-dpo", "lora", "text-to-image"} <= set(card.data.tags)
    assert "| `method.beta` | 5000.0 |" in card.text
    assert to_dict(load_config(final / "mmalign_config.yaml")) == to_dict(cfg)
    assert [a.command for a in card_commands(final)] == ["generate", "eval", "train"]


def test_push_to_hub_is_refused_before_anything_runs_when_it_cannot_upload(
    tiny_sd15, pair_manifest, tmp_path, monkeypatch
):
    import huggingface_hub

    from mmalign.config import ConfigError

    cfg = tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "run", "train.push_to_hub=true")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="push_to_hub.*HF_HUB_OFFLINE"):
        train(cfg)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError, match="push_to_hub=true needs a Hugging Face token"):
        train(cfg)
    bad = tiny_cfg(
        tiny_sd15, pair_manifest, tmp_path / "run", "train.push_to_hub=true", "train.hub_model_id=a/b/c"
    )
    with pytest.raises(
        ConfigError, match="train.hub_model_id is not a hub repo id: Repo id must be in the form"
    ):
        train(bad)
    assert not (tmp_path / "run").exists()


def test_push_to_hub_uploads_final_with_a_card_that_loads_from_the_repo(
    tiny_sd15, pair_manifest, tmp_path, monkeypatch, capsys
):
    """huggingface_hub's create_repo/upload_folder stand in for the Hub: the upload is final/ with a card naming
    the repo; a failed upload exits 3 with how to upload later, the export and checkpoint kept."""
    from types import SimpleNamespace

    import huggingface_hub

    from mmalign.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(
        huggingface_hub, "create_repo", lambda repo_id, **kw: SimpleNamespace(repo_id=f"me/{repo_id}")
    )
    uploads = []

    def upload_folder(repo_id, folder_path, **kw):
        uploads.append((repo_id, Path(folder_path), (Path(folder_path) / "README.md").read_text()))
        return SimpleNamespace(repo_url=f"https://huggingface.co/{repo_id}")

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    overrides = tiny_overrides(tiny_sd15, pair_manifest, tmp_path / "run", "train.max_steps=1")
    result = train(load_config(None, [*overrides, "train.push_to_hub=true"]))
    pushed = {"repo_id": "me/run", "url": "https://huggingface.co/me/run"}
    assert result.summary["push_to_hub"] == pushed
    assert json.loads((tmp_path / "run/summary.json").read_text())["push_to_hub"] == pushed
    ((repo, folder, card),) = uploads
    assert repo == "me/run" and folder == tmp_path / "run/final"
    assert 'pipe.load_lora_weights("me/run")' in card and "path/to/this/folder" not in card

    def refused(**kw):
        raise OSError("Connection reset by peer")

    monkeypatch.setattr(huggingface_hub, "upload_folder", refused)
    (tmp_path / "run.yaml").write_text("{}\n")
    out = tmp_path / "again"
    code = main(
        ["train", str(tmp_path / "run.yaml"), *overrides, f"train.output_dir={out}", "train.push_to_hub=true"]
    )
    assert code == 3
    said = capsys.readouterr().out
    assert "upload to me/again failed: OSError: Connection reset by peer" in said
    assert f"huggingface-cli upload me/again {out / 'final'}" in said
    assert (out / "final/pytorch_lora_weights.safetensors").is_file() and (out / "checkpoints").is_dir()


def test_a_model_card_that_cannot_be_written_costs_the_run_nothing(
    tiny_sd15, pair_manifest, tmp_path, monkeypatch, capsys
):
    import mmalign.trainers.loop as loop

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(loop, "write_model_card", broken)
    result = train(tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "run", "train.max_steps=1"))
    assert (tmp_path / "run/summary.json").is_file() and result.summary["steps"] == 1
    assert (tmp_path / "run/final/pytorch_lora_weights.safetensors").is_file()
    assert "could not write the model card: OSError: No space left on device" in capsys.readouterr().out


def test_full_finetune_exports_a_diffusers_unet(tiny_sd15, pair_manifest, tmp_path):
    from diffusers import UNet2DConditionModel

    result = train(
        tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "run", "lora.enabled=false", "train.max_steps=1")
    )
    unet = UNet2DConditionModel.from_pretrained(f"{result.summary['export']}/unet")
    card = card_code(Path(result.summary["export"]))["pipe"].unet  # the model card's lines load it too
    for (name, a), (_, b), (_, c) in zip(
        unet.named_parameters(), result.denoiser.named_parameters(), card.named_parameters()
    ):
        assert torch.equal(a, b.detach().cpu()) and torch.equal(a, c), name


def test_cached_and_uncached_paths_give_the_same_loss(tiny_sdxl, pair_manifest, tmp_path):
    from mmalign.data.cache import CachedPairDataset, LatentCache
    from mmalign.trainers.common import TrainModels
    from mmalign.trainers.diffusion_dpo import DiffusionDPOConfig, compute_loss
    from mmalign.trainers.loop import add_lora

    pipe, family = load_pipeline(str(tiny_sdxl))
    adapter = make_adapter(pipe, family)
    cfg = tiny_cfg(tiny_sdxl, pair_manifest, tmp_path)
    add_lora(pipe.unet, cfg.lora)
    with torch.no_grad():  # move off the reference so the loss is not exactly log 2
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    models = TrainModels(adapter, pipe.unet)
    records, _ = load_pairs(pair_manifest)
    cache = LatentCache(tmp_path / "cache", {"test": 1})
    records, keys, _ = cache.build(
        records, adapter, resolution=16, random_flip=False, joint_crop=True, progress=False
    )
    raw_uncached = collate_pairs(
        [PairDataset(records, 16, random_flip=False, joint_crop=True)[i] for i in (0, 1)]
    )
    raw_cached = collate_pairs(
        [CachedPairDataset(records, keys, cache, random_flip=False)[i] for i in (0, 1)]
    )
    losses, calls = [], []
    for raw, c in [(raw_uncached, None), (raw_cached, cache)]:
        torch.manual_seed(123)
        batch = prepare_pair_batch(raw, adapter, c, 0.5, 16, torch.device("cpu"))
        calls.append(batch["prompts"])
        losses.append(compute_loss(batch, models, DiffusionDPOConfig())[0])
    assert calls[0] == calls[1]  # same caption dropout draws
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-6)
    assert abs(losses[0].item() - math.log(2)) > 1e-6


def test_cache_is_reused_and_training_never_runs_the_vae(tiny_sd15, pair_manifest, tmp_path, monkeypatch):
    cfg = tiny_cfg(
        tiny_sd15, pair_manifest, tmp_path / "a", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1"
    )
    train(cfg)
    shards = sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert shards  # latents and text embeddings written once

    from mmalign.pipelines import sd15

    def fail(*args, **kwargs):
        raise AssertionError("VAE/text encoder ran although everything is cached")

    monkeypatch.setattr(sd15.SD15Adapter, "latent_moments", fail)
    monkeypatch.setattr(sd15.SD15Adapter, "encode_prompts", fail)
    train(
        tiny_cfg(
            tiny_sd15,
            pair_manifest,
            tmp_path / "b",
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.max_steps=2",
        )
    )
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors")) == shards


def test_resume_continues_at_the_right_step_with_the_same_optimizer_state(tiny_sd15, pair_manifest, tmp_path):
    common = ("train.max_steps=4", "train.checkpoint_every=2", f"data.cache_dir={tmp_path / 'cache'}")
    train(tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "straight", *common))
    # interrupted run: stops after 2 steps, then resumes to 4
    train(tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "split", *common, "train.max_steps=2"))
    ckpt = tmp_path / "split/checkpoints/checkpoint-2"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    opt_a = load_file(tmp_path / "straight/checkpoints/checkpoint-2/optimizer.safetensors")
    opt_b = load_file(ckpt / "optimizer.safetensors")
    assert any(k.endswith("/exp_avg") for k in opt_a) and opt_a.keys() == opt_b.keys()
    for k in opt_a:
        assert torch.equal(opt_a[k], opt_b[k]), k
    resumed = train(tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "split", *common, "train.resume=latest"))
    assert resumed.summary["steps"] == 4
    history = [
        json.loads(line)["step"] for line in (tmp_path / "split/history.jsonl").read_text().splitlines()
    ]
    assert history == [1, 2, 3, 4]  # appended across the resume
    final_a = load_file(tmp_path / "straight/checkpoints/checkpoint-4/trainable.safetensors")
    final_b = load_file(tmp_path / "split/checkpoints/checkpoint-4/trainable.safetensors")
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name  # exact, not close


def test_bad_items_error_names_file_or_are_skipped_and_reported(tiny_sd15, pair_manifest, tmp_path):
    from mmalign.data import DataError

    lines = pair_manifest.read_text().splitlines()
    bad = dict(json.loads(lines[0]), chosen=str(tmp_path / "nope.png"))
    (tmp_path / "corrupt.png").write_bytes(b"garbage")
    corrupt = dict(json.loads(lines[1]), rejected=str(tmp_path / "corrupt.png"))
    manifest = pair_manifest.parent / "with_bad.jsonl"
    manifest.write_text("\n".join([*lines, json.dumps(bad), json.dumps(corrupt)]) + "\n")
    with pytest.raises(DataError, match=r"with_bad.jsonl:5 \(chosen: .*nope.png\)"):
        train(tiny_cfg(tiny_sd15, manifest, tmp_path / "strict", "train.max_steps=1"))
    for cache in ("true", "false"):
        result = train(
            tiny_cfg(
                tiny_sd15,
                manifest,
                tmp_path / f"skip{cache}",
                "data.on_bad_item=skip",
                f"data.cache={cache}",
                "train.max_steps=4",
            )
        )
        skipped = result.summary["skipped_items"]
        assert any("nope.png" in s for s in skipped) and any(
            "corrupt.png" in s and "with_bad.jsonl:6" in s for s in skipped
        )


def test_non_finite_loss_stops_and_keeps_finished_checkpoints(
    tiny_sd15, pair_manifest, tmp_path, monkeypatch
):
    import dataclasses

    from mmalign.trainers import METHODS

    method = METHODS["diffusion_dpo"]
    real = method.compute_loss
    calls = {"n": 0}

    def nan_on_third(batch, models, cfg):
        calls["n"] += 1
        loss, metrics = real(batch, models, cfg)
        return (loss * float("nan") if calls["n"] == 3 else loss), metrics

    monkeypatch.setitem(METHODS, "diffusion_dpo", dataclasses.replace(method, compute_loss=nan_on_third))
    with pytest.raises(TrainingError, match=r"non-finite loss .* step 3 .*checkpoint-2"):
        train(
            tiny_cfg(
                tiny_sd15, pair_manifest, tmp_path / "run", "train.checkpoint_every=1", "train.max_steps=5"
            )
        )
    assert (tmp_path / "run/checkpoints/checkpoint-2/trainable.safetensors").is_file()


def test_validation_grid_is_written(tiny_sd15, pair_manifest, tmp_path):
    from PIL import Image

    train(
        tiny_cfg(
            tiny_sd15,
            pair_manifest,
            tmp_path / "run",
            "train.max_steps=2",
            "train.validation_every=2",
            "train.validation_prompts=[a red square, a blue circle]",
            "train.validation_steps=2",
        )
    )
    grid = Image.open(tmp_path / "run/validation/step-000002.png")
    assert grid.size[0] > 16 and grid.size[1] >= 16
    assert (tmp_path / "run/validation/step-000000.png").is_file()  # the base, before any step
    assert Image.open(tmp_path / "run/training_curves.png").size[0] > 100


@pytest.mark.parametrize(
    "options",
    [
        ("train.mixed_precision=bf16", "train.gradient_checkpointing=true"),
        (
            "train.optimizer=adafactor",
            "train.gradient_accumulation_steps=2",
            "train.lr_scheduler=cosine",
            "train.warmup_steps=1",
        ),
        (
            "method.loss_type=ipo",
            "method.sft_weight=0.5",
            "method.independent_noise=true",
            "data.caption_dropout=0.5",
        ),
    ],
    ids=["bf16-checkpointing", "adafactor-accumulation-cosine", "ipo-sft-noise-dropout"],
)
def test_loop_options_train(tiny_sd15, pair_manifest, tmp_path, options):
    result = train(tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "run", *options), keep_initial=True)
    changed = [
        not torch.equal(p.detach().cpu(), result.initial_trainable[n])
        for n, p in result.denoiser.named_parameters()
        if p.requires_grad
    ]
    assert changed and all(changed)
    assert math.isfinite(result.summary["final_metrics"]["loss"])


def test_implicit_accuracy_bench_sees_what_dpo_learned(tiny_sd15, pair_manifest, tmp_path):
    """bench/implicit_accuracy.py in its tiny mode: a LoRA trained on the pairs ranks them under forward noising."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "implicit_accuracy", Path(__file__).resolve().parents[2] / "bench" / "implicit_accuracy.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = train(
        tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "run", "train.learning_rate=5e-2", "train.max_steps=6")
    )
    row = bench.implicit_accuracy(
        str(tiny_sd15), result.summary["export"], str(pair_manifest), resolution=16, draws=8
    )
    assert row["n"] == 4 * 8 and row["implicit_acc_forward"] > 0.5, row
    bands = row["bands"]  # every draw falls in exactly one band, and the bands add up to the whole
    assert sum(b["n"] for b in bands) == row["n"]
    assert sum(b["implicit_acc"] * b["n"] for b in bands) == pytest.approx(
        row["implicit_acc_forward"] * row["n"], abs=1e-2
    )


def test_summary_measures_time_spent_waiting_for_data(tiny_sd15, pair_manifest, tmp_path, monkeypatch):
    """summary.json's data_wait_fraction: small when batches are ready, most of the run when reading is slow."""
    import time

    from mmalign.data.seeded import SeededItems

    fast = train(tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "fast")).summary
    assert 0 <= fast["data_wait_seconds"] <= fast["seconds"]
    read = SeededItems.__getitem__

    def slow(self, index):
        time.sleep(0.5)
        return read(self, index)

    monkeypatch.setattr(SeededItems, "__getitem__", slow)
    slow_run = train(tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "slow")).summary
    assert slow_run["data_wait_seconds"] >= 3 * 2 * 0.5  # 3 steps x 2 items, each read waited for
    assert slow_run["data_wait_fraction"] > max(0.5, fast["data_wait_fraction"])


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_bf16_trainable_weights_train_like_fp32_and_resume_exactly(tiny_sd15, pair_manifest, tmp_path, lora):
    """train.trainable_dtype=bf16: the model's trained weights are bf16, the optimizer's fp32 masters are in the
    checkpoint, the losses follow the fp32-weight run's, and a stopped run resumes to the uninterrupted one."""
    # full fine-tuning stores every weight in bf16, norms included, which autocast would have kept fp32: a
    # different forward, whose effect beta 5000 amplifies into unrelated losses; compared at beta 50
    beta = "method.beta=5000" if lora else "method.beta=50"
    bf16 = ("train.mixed_precision=bf16", f"lora.enabled={str(lora).lower()}", "train.max_steps=4", beta)
    common = (*bf16, "train.checkpoint_every=2", f"data.cache_dir={tmp_path / 'cache'}")
    ref = train(tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "fp32", *common))
    straight = train(
        tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "straight", *common, "train.trainable_dtype=bf16")
    )
    trained = [p for p in straight.denoiser.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.bfloat16 for p in trained)
    opt = load_file(tmp_path / "straight/checkpoints/checkpoint-4/optimizer.safetensors")
    masters = {k: v for k, v in opt.items() if k.endswith("/master")}
    assert len(masters) == len(trained) and all(v.dtype == torch.float32 for v in masters.values())

    def losses(run):
        return [
            json.loads(line)["loss"] for line in (tmp_path / run / "history.jsonl").read_text().splitlines()
        ]

    # the same batches, noise and timesteps; the weights are stored rounded to bf16, clipped and stepped in fp32
    # measured: LoRA equal to 4 digits (the base weights are bf16 either way); full within 1.4%
    assert losses("straight") == pytest.approx(losses("fp32"), rel=1e-3 if lora else 0.03)
    assert ref.summary["steps"] == straight.summary["steps"] == 4

    split = tmp_path / "split"
    train(
        tiny_cfg(tiny_sd15, pair_manifest, split, *common, "train.trainable_dtype=bf16", "train.max_steps=2")
    )
    train(
        tiny_cfg(
            tiny_sd15, pair_manifest, split, *common, "train.trainable_dtype=bf16", "train.resume=latest"
        )
    )
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        a = load_file(tmp_path / f"straight/checkpoints/checkpoint-4/{name}")
        b = load_file(split / f"checkpoints/checkpoint-4/{name}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # a checkpoint of fp32 weights does not silently continue as a bf16 run (or the other way)
    with pytest.raises(ConfigError, match="trainable_dtype=fp32, this run has bf16"):  # a setting: exit 2
        train(
            tiny_cfg(
                tiny_sd15,
                pair_manifest,
                tmp_path / "mixed",
                *common,
                "train.trainable_dtype=bf16",
                f"train.resume={tmp_path / 'fp32/checkpoints/checkpoint-2'}",
            )
        )


def test_a_cache_built_in_one_precision_is_not_read_in_another(tiny_sd15, pair_manifest, tmp_path):
    """Text embeddings cached by fp32 text encoders are other numbers than bf16 ones (and a batch mixing the two
    does not stack under autocast): the text encoders' dtype is part of the cache's fingerprint."""
    cache = tmp_path / "cache"
    for i, precision in enumerate(["no", "bf16", "no"]):
        train(
            tiny_cfg(
                tiny_sd15,
                pair_manifest,
                tmp_path / f"run{i}",
                f"train.mixed_precision={precision}",
                f"data.cache_dir={cache}",
                "train.max_steps=1",
            )
        )
    dtypes = sorted(json.loads(p.read_text())["text_dtype"] for p in cache.glob("*/fingerprint.json"))
    assert dtypes == ["torch.bfloat16", "torch.float32"]  # the third run reused the first run's cache


def test_an_accumulated_step_logs_the_mean_of_its_micro_batches(
    tiny_sd15, pair_manifest, tmp_path, monkeypatch
):
    """With gradient accumulation a step's loss and metrics are its micro-batches' mean (the last one's before: with
    batch 1 x 4, implicit_acc could only read 0 or 1)."""
    import dataclasses

    import mmalign.trainers as trainers

    method = trainers.get_method("diffusion_dpo")
    seen = []

    def recording(*args, **kwargs):
        loss, metrics = method.compute_loss(*args, **kwargs)
        seen.append((loss.item(), metrics["implicit_acc"].float().mean().item()))
        return loss, metrics

    monkeypatch.setitem(
        trainers.METHODS, "diffusion_dpo", dataclasses.replace(method, compute_loss=recording)
    )
    options = ("train.batch_size=1", "train.gradient_accumulation_steps=4", "train.max_steps=2")
    train(tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "run", *options))
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert len(seen) == 8 and [h["step"] for h in history] == [1, 2]
    for h, window in zip(history, (seen[:4], seen[4:])):
        assert h["loss"] == pytest.approx(sum(x[0] for x in window) / 4, rel=1e-5)
        assert h["implicit_acc"] == pytest.approx(sum(x[1] for x in window) / 4, rel=1e-5)


@pytest.mark.parametrize("mode", ["data.cache=false", "data.cache_build=lazy"])
def test_a_missing_image_stops_an_unencoded_run_before_step_1(tiny_sd15, pair_manifest, tmp_path, mode):
    """Without the encoding pass a missing file was found when a batch drew it, steps (and checkpoints) later."""
    from mmalign.data import DataError

    rows = pair_manifest.read_text().splitlines()
    bad = pair_manifest.with_name("bad.jsonl")
    bad.write_text("\n".join([*rows, json.dumps({**json.loads(rows[0]), "rejected": "gone.png"})]) + "\n")
    with pytest.raises(
        DataError, match=rf"bad\.jsonl:{len(rows) + 1} \(rejected: .*gone\.png\): file not found"
    ):
        train(tiny_cfg(tiny_sd15, bad, tmp_path / "run", mode, f"data.cache_dir={tmp_path / 'c'}"))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )
