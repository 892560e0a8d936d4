"""Checkpoints and resume (issue 14): no pickle on load, never a lost checkpoint, exact resume, stop signals,
runs that never mix (issue 12)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.config import ConfigError
from mmalign.data.seeded import SeededItems
from mmalign.trainers import checkpoint as ck
from mmalign.trainers import load_config
from mmalign.trainers.loop import TrainingError, train

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


def tiny_cfg(model, manifest, out, *extra):
    return load_config(
        None,
        [
            f"model.pretrained={model}",
            "model.resolution=16",
            f"data.source={manifest}",
            f"train.output_dir={out}",
            "train.batch_size=1",
            "train.report_to=none",
            "train.progress=false",
            "train.learning_rate=1e-2",
            "train.scale_lr=false",
            "lora.rank=2",
            "method.beta=5000",
            "data.random_flip=true",
            "train.log_every=1",
            f"data.cache_dir={Path(out).parent / 'cache'}",
            *extra,
        ],
    )


def trainable(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / f"checkpoints/checkpoint-{step}/trainable.safetensors")


# --------------------------------------------------------------------------------------------------
# 1. no pickle on any load path


class Payload:
    """Unpickling this writes a marker file: proof that a loader executed checkpoint data."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def plant(folder: Path, marker: Path, names: list[str]) -> None:
    """Overwrite ``names`` with a pickled payload (both raw pickle and torch.save zip), then re-sign the marker
    so the loader gets past the checksums and must actually parse the files."""
    import pickle

    for i, name in enumerate(names):
        path = folder / name
        if i % 2:
            path.write_bytes(pickle.dumps(Payload(marker)))
        else:
            torch.save({"state": Payload(marker)}, path)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(folder.iterdir())
        if p.name != ck.COMPLETE_FILE
    }
    (folder / ck.COMPLETE_FILE).write_text(json.dumps({"files": files}))


def test_resume_never_unpickles_a_planted_payload(tiny_sd15, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "run"
    cfg = [
        f"model.pretrained={tiny_sd15}",
        "model.resolution=16",
        f"data.source={prompts}",
        f"train.output_dir={out}",
        "train.batch_size=2",
        "train.report_to=none",
        "train.progress=false",
        "lora.rank=2",
        "method.name=self_npo",
        "method.ema_decay=0.5",
        "train.max_steps=1",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    train(load_config(None, cfg))
    good = out / "checkpoints/checkpoint-1"
    files = sorted(p.name for p in good.iterdir() if p.name != ck.COMPLETE_FILE)
    assert {"method_state.safetensors", "optimizer.safetensors", "rng-0.json", "state.json"} <= set(files)
    marker = tmp_path / "pwned"
    # each file alone (a payload anywhere is refused, the marker never written) ...
    for name in files:
        bad = tmp_path / f"bad-{name}"
        bad.mkdir()
        for p in good.iterdir():
            (bad / p.name).write_bytes(p.read_bytes())
        plant(bad, marker, [name])
        with pytest.raises(ck.CheckpointError, match=name.replace(".", r"\.")):
            ck.read_checkpoint(bad)
        assert not marker.exists(), name
    # ... and every file at once, plus the files accelerate's save_state would have written, through a real resume
    plant(
        good,
        marker,
        [
            *files,
            "optimizer.bin",
            "scheduler.bin",
            "random_states_0.pkl",
            "custom_checkpoint_0.pkl",
            "pytorch_model.bin",
        ],
    )
    with pytest.raises(TrainingError, match="no usable checkpoint .*checkpoint-1"):
        train(load_config(None, [*cfg, "train.max_steps=2", "train.resume=latest"]))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# 2. checkpoints never lost: rotation, foreign folders, corrupt newest, missing tensors, recovery


class OneProcess:
    is_main_process, process_index = True, 0

    def wait_for_everyone(self):
        pass


def parts(seed: int = 0) -> ck.Saveable:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return ck.Saveable(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))


def save(root, step, run_id="me", keep=2, p=None):
    return ck.save_checkpoint(
        root,
        step,
        {"run_id": run_id, "epoch": 0, "batch": step, "micro_step": step},
        p or parts(step),
        OneProcess(),
        keep,
    )


def test_rotation_touches_only_this_runs_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "checkpoint-best").mkdir()  # foreign name
    (root / "checkpoint-99").mkdir()  # empty, incomplete
    save(root, 1, run_id="other-run")  # another run's
    for step in (2, 3, 4, 5):
        save(root, step)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["checkpoint-1", "checkpoint-4", "checkpoint-5", "checkpoint-99", "checkpoint-best"]
    assert [p.name for p in ck.list_checkpoints(root, "me")] == ["checkpoint-4", "checkpoint-5"]
    assert [p.name for p in ck.incomplete_checkpoints(root)] == ["checkpoint-99"]
    # a re-save at the same step replaces it and keeps the other
    save(root, 5, p=parts(7))
    assert [p.name for p in ck.list_checkpoints(root, "me")] == ["checkpoint-4", "checkpoint-5"]
    assert torch.equal(
        ck.read_checkpoint(root / "checkpoint-5").trainable["weight"], parts(7).model.weight.detach()
    )


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path, optimizer):
    from transformers.optimization import Adafactor

    def make(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        opt = (
            torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
            if optimizer == "adamw"
            else Adafactor(model.parameters(), lr=0.1, relative_step=False, scale_parameter=False)
        )
        return ck.Saveable(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s))

    a = make(0)
    for _ in range(3):
        a.model(torch.randn(4, 3)).sum().backward()
        a.optimizer.step()
        a.scheduler.step()
        a.optimizer.zero_grad()
    path = ck.save_checkpoint(tmp_path, 3, {"run_id": "me"}, a, OneProcess(), None)
    b = make(1)
    ck.apply_checkpoint(ck.read_checkpoint(path), b)
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and a.scheduler.state_dict() == b.scheduler.state_dict()
    for pid, entries in sa["state"].items():
        for name, value in entries.items():
            other = sb["state"][pid][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name
    # the next step is identical too
    x = torch.randn(4, 3)
    for p in (a, b):
        p.model(x).sum().backward()
        p.optimizer.step()
    assert torch.equal(a.model.weight, b.model.weight)


def test_resume_takes_this_runs_optimizer_kernel(tmp_path):
    """The fused/foreach choice is the resuming run's, not the checkpoint's: a checkpoint from a foreach AdamW (what
    runs before the fused default wrote) resumes into a fused one with the same state and the same next step."""

    def make(seed, **kernel):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, **kernel)
        return ck.Saveable(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s))

    a = make(0, foreach=True)
    a.model(torch.randn(4, 3)).sum().backward()
    a.optimizer.step()
    a.optimizer.zero_grad()
    path = ck.save_checkpoint(tmp_path, 1, {"run_id": "me"}, a, OneProcess(), None)
    b = make(1, fused=True)
    ck.apply_checkpoint(ck.read_checkpoint(path), b)
    group = b.optimizer.param_groups[0]
    assert group["fused"] is True and not group["foreach"]
    x = torch.randn(4, 3)
    for p in (a, b):
        p.model(x).sum().backward()
        p.optimizer.step()
    torch.testing.assert_close(a.model.weight, b.model.weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "delete", "garbage-marker", "no-marker"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    root = tmp_path / "checkpoints"
    save(root, 1, keep=None)
    newest = save(root, 2, keep=None)
    target = newest / "optimizer.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:20])
    elif damage == "flip-byte":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    elif damage == "garbage-marker":
        (newest / ck.COMPLETE_FILE).write_text("{not json")
    warnings = []
    if damage == "no-marker":  # an unfinished save is not a checkpoint at all: skipped silently, as intended
        (newest / ck.COMPLETE_FILE).unlink()
    ckpt = ck.load_latest(root, "me", 0, warn=warnings.append)
    assert ckpt.step == 1
    if damage != "no-marker":
        assert len(warnings) == 1 and "checkpoint-2" in warnings[0] and "previous" in warnings[0]


def test_missing_trainable_tensors_are_a_clear_error(tmp_path):
    ckpt = ck.read_checkpoint(save(tmp_path / "checkpoints", 1))
    del ckpt.trainable["bias"]
    target = parts(1)
    before = target.model.weight.detach().clone()
    with pytest.raises(ck.CheckpointError, match=r"trainable.safetensors: .*1 missing, e\.g\. \['bias'\]"):
        ck.apply_checkpoint(ckpt, target)
    assert torch.equal(target.model.weight, before)  # checked before anything is loaded


@pytest.mark.parametrize(
    "point",
    [
        "ckpt-begin",
        "ckpt-weights",
        "ckpt-optimizer",
        "ckpt-files",
        "ckpt-marker",
        "ckpt-old-moved",
        "ckpt-renamed",
        "ckpt-rotating",
        "ckpt-done",
    ],
)
def test_a_crash_anywhere_in_a_save_loses_no_finished_checkpoint(tmp_path, monkeypatch, point):
    root = tmp_path / "checkpoints"
    save(root, 1)
    save(root, 2)
    monkeypatch.setenv("MMALIGN_FAULT_ACTION", "raise")
    # ckpt-old-moved only happens on a re-save of an existing step; the others on a new step 3 (which rotates)
    step = 2 if point == "ckpt-old-moved" else 3
    monkeypatch.setenv(ck.FAULT_ENV, f"{point}@{step}")
    with pytest.raises(ck.InjectedFault):
        save(root, step, p=parts(9))
    monkeypatch.delenv(ck.FAULT_ENV)
    ck.recover(root)
    steps = [ck.checkpoint_step(p) for p in ck.list_checkpoints(root, "me")]
    assert 2 in steps and all(not p.name.startswith(".") for p in root.iterdir())
    for step_found in steps:
        ck.read_checkpoint(root / f"checkpoint-{step_found}")  # every listed checkpoint reads back whole


def test_checkpoint_limit_and_overwrite_are_validated():
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match="checkpoints_total_limit"):
            load_config(None, [f"train.checkpoints_total_limit={bad}"])
    with pytest.raises(ConfigError, match="set only one"):
        load_config(None, ["train.overwrite=true", "train.resume=latest"])


# --------------------------------------------------------------------------------------------------
# 3. exact resume, mid-epoch and across crashes inside saves


def test_items_draw_augmentation_from_their_own_seed_not_the_global_rng():
    class Flips(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.rand(())

    items = SeededItems(Flips(), seed=3)
    torch.manual_seed(0)
    first = [items[i] for i in range(8)]
    state = torch.get_rng_state()
    torch.rand(5)
    assert [items[i] for i in range(8)] == first  # independent of the global stream ...
    assert not torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    _ = items[0]
    assert torch.equal(torch.get_rng_state(), before)  # ... and leaves it untouched
    items.set_epoch(1)
    assert [items[i] for i in range(8)] != first  # a new epoch draws anew


def test_crash_and_resume_at_many_points_gives_identical_weights(
    tiny_sd15, pair_manifest, tmp_path, monkeypatch, capsys
):
    # 4 pairs, batch 1: 4 batches an epoch; checkpoints at 3, 6, 9 are mid-epoch; flips on; limit 1 rotates
    common = ("train.max_steps=10", "train.checkpoint_every=3", "train.checkpoints_total_limit=1")
    straight = tmp_path / "straight"
    train(tiny_cfg(tiny_sd15, pair_manifest, straight, *common))
    run = tmp_path / "crashy"
    monkeypatch.setenv("MMALIGN_FAULT_ACTION", "raise")
    crashes = [
        "step@2",
        "ckpt-files@3",
        "ckpt-renamed@3",
        "step@5",
        "ckpt-rotating@6",
        "ckpt-marker@9",
        "step@10",
    ]
    for i, where in enumerate(crashes):
        monkeypatch.setenv(ck.FAULT_ENV, where)
        with pytest.raises(ck.InjectedFault):
            train(tiny_cfg(tiny_sd15, pair_manifest, run, *common, "train.resume=latest"))
        if i == 0:
            assert "no checkpoint of this run" in capsys.readouterr().out
    monkeypatch.delenv(ck.FAULT_ENV)
    result = train(tiny_cfg(tiny_sd15, pair_manifest, run, *common, "train.resume=latest"))
    assert "resumed from" in capsys.readouterr().out and result.summary["steps"] == 10
    rerun = load_config(run / "final" / "mmalign_config.yaml")  # the card's rerun recipe starts a run anew
    assert rerun.train.resume is None and rerun.train.overwrite is False
    a, b = trainable(straight, 10), trainable(run, 10)
    assert max((a[n] - b[n]).abs().max().item() for n in a) == 0.0
    history = [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert history == list(range(1, 11))
    straight_history = [json.loads(line) for line in (straight / "history.jsonl").read_text().splitlines()]
    assert [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()] == straight_history
    # a requeued job that had already finished runs nothing and keeps the finished run's summary (metrics included)
    finished = json.loads((run / "summary.json").read_text())
    again = train(tiny_cfg(tiny_sd15, pair_manifest, run, *common, "train.resume=latest"))
    assert "no steps (already at step 10)" in capsys.readouterr().out
    assert finished["final_metrics"] and again.summary == finished
    assert json.loads((run / "summary.json").read_text()) == finished


# --------------------------------------------------------------------------------------------------
# 5. runs that never mix


def test_a_non_empty_output_dir_needs_resume_or_overwrite(tiny_sd15, pair_manifest, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"not empty .*train\.resume=latest .*train\.overwrite=true"):
        train(tiny_cfg(tiny_sd15, pair_manifest, out, "train.max_steps=1"))


def test_resuming_with_another_lora_rank_is_a_config_error_that_keeps_the_checkpoint(
    tiny_sd15, pair_manifest, tmp_path
):
    """A sound checkpoint written with other settings is the user's input (exit 2, what to do), not a crash of
    training (exit 3); the checkpoint stays as it was and resumes with its own settings."""
    out = tmp_path / "run"
    train(
        tiny_cfg(
            tiny_sd15, pair_manifest, out, "train.max_steps=2", "train.checkpoint_every=1", "lora.rank=2"
        )
    )
    (ckpt,) = ck.list_checkpoints(out)[-1:]
    before = (ckpt / "trainable.safetensors").read_bytes()
    resume = ["train.max_steps=3", "train.checkpoint_every=1", "train.resume=latest"]
    with pytest.raises(
        ConfigError,
        match=r"train.resume=latest: .*has shape \(2, .*another lora.rank or model\? \(or start anew",
    ):
        train(tiny_cfg(tiny_sd15, pair_manifest, out, *resume, "lora.rank=4"))
    assert (ckpt / "trainable.safetensors").read_bytes() == before
    # the checkpoint's optimizer would keep the old learning rate while config.yaml and the card said the new one
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(
        ConfigError,
        match=r"train.resume=latest: .*checkpoint fixes \(train.learning_rate=0.01 -> 0.005; "
        r"train.batch_size=1 -> 2\): resume with the run's own values",
    ):
        train(
            tiny_cfg(
                tiny_sd15,
                pair_manifest,
                out,
                *resume,
                "lora.rank=2",
                "train.learning_rate=5e-3",
                "train.batch_size=2",
            )
        )
    assert (out / "config.yaml").read_text() == config_before
    assert train(tiny_cfg(tiny_sd15, pair_manifest, out, *resume, "lora.rank=2")).summary["steps"] == 3


def test_a_second_run_into_a_folder_a_live_run_holds_is_refused(tiny_sd15, pair_manifest, tmp_path):
    """Two `mmalign train` into one folder (a requeued job while the first still runs) interleaved history.jsonl
    and overwrote each other's checkpoints; the live run's lock on the folder refuses the second."""
    import fcntl
    import os

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)  # what a live run holds
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(ConfigError, match=r"another training run is writing there now"):
            train(tiny_cfg(tiny_sd15, pair_manifest, out, "train.max_steps=1", "train.resume=latest"))
    finally:
        os.close(fd)
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written by the refused run
    assert train(tiny_cfg(tiny_sd15, pair_manifest, out, "train.max_steps=1")).summary["steps"] == 1
    # the lock ends with the run: the same process trains there again
    assert (
        train(tiny_cfg(tiny_sd15, pair_manifest, out, "train.max_steps=2", "train.resume=latest")).summary[
            "steps"
        ]
        == 2
    )


def test_fp16_without_a_gpu_is_refused_before_anything_is_written(tiny_sd15, pair_manifest, tmp_path):
    """accelerate runs no fp16 autocast on CPU: the frozen parts would be fp16 and the step would crash later."""
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="train.mixed_precision=fp16 needs a GPU .*bf16 or no"):
        train(tiny_cfg(tiny_sd15, pair_manifest, out, "train.mixed_precision=fp16"))
    assert not out.exists()


def test_a_run_that_failed_before_its_first_step_leaves_a_dir_the_next_run_may_use(
    tiny_sd15, pair_manifest, tmp_path
):
    out, bad = tmp_path / "run", tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "missing.png", "rejected": "missing.png"}\n')
    with pytest.raises(ValueError, match="missing.png"):
        train(tiny_cfg(tiny_sd15, bad, out, "train.max_steps=1"))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "run.json"]  # nothing a run made
    assert train(tiny_cfg(tiny_sd15, pair_manifest, out, "train.max_steps=1")).summary["steps"] == 1
    # a run that crashed inside its first step (its step-0 grid and an empty history written) is not one either
    crashed = tmp_path / "crashed"
    for name in ("validation", "logs", "checkpoints"):
        (crashed / name).mkdir(parents=True)
    (crashed / "validation" / "step-000000.png").write_bytes(b"png")
    (crashed / "history.jsonl").write_text("")
    assert train(tiny_cfg(tiny_sd15, pair_manifest, crashed, "train.max_steps=1")).summary["steps"] == 1
    (crashed / "history.jsonl").write_text("")  # but a checkpoint, a logged step or an export is a run
    with pytest.raises(ConfigError, match="not empty"):
        train(tiny_cfg(tiny_sd15, pair_manifest, crashed, "train.max_steps=1"))


def test_overwrite_starts_a_new_run_that_never_touches_the_old_checkpoints(
    tiny_sd15, pair_manifest, tmp_path
):
    out = tmp_path / "run"
    train(tiny_cfg(tiny_sd15, pair_manifest, out, "train.max_steps=4", "train.checkpoint_every=2"))
    old = {p.name: ck.run_id_of(p) for p in ck.list_checkpoints(out)}
    assert sorted(old) == ["checkpoint-2", "checkpoint-4"]
    train(
        tiny_cfg(
            tiny_sd15,
            pair_manifest,
            out,
            "train.max_steps=3",
            "train.checkpoint_every=1",
            "train.checkpoints_total_limit=1",
            "train.overwrite=true",
        )
    )
    now = {p.name: ck.run_id_of(p) for p in ck.list_checkpoints(out)}
    new_id = json.loads((out / "run.json").read_text())["run_id"]
    # the old run's checkpoint-4 survives rotation (limit 1); its checkpoint-2 was replaced by the new run's own
    # checkpoint-2 (same name), which the new run then rotated out
    assert now == {"checkpoint-4": old["checkpoint-4"], "checkpoint-3": new_id} and new_id not in old.values()
    assert (
        ck.load_latest(out / "checkpoints", new_id, 0).step == 3
    )  # resume=latest never picks the old run's 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint"].endswith("checkpoint-3") and summary["steps"] == 3
    # the old run's export and report were set aside (never describing the new run while it trains), not deleted
    aside = out / "superseded" / old["checkpoint-4"]
    assert json.loads((aside / "summary.json").read_text())["steps"] == 4
    assert (aside / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert len((aside / "history.jsonl").read_text().splitlines()) == 4 and (aside / "config.yaml").is_file()


# --------------------------------------------------------------------------------------------------
# 4. signals (a real process)


def _start(out: Path, model: Path, manifest: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [
        f"model.pretrained={model}",
        "model.resolution=16",
        f"data.source={manifest}",
        f"train.output_dir={out}",
        "train.batch_size=1",
        "train.report_to=none",
        "train.progress=false",
        "lora.rank=2",
        "train.max_steps=100000",
        "train.checkpoint_every=0",
        f"data.cache_dir={out.parent / 'cache'}",
        *extra,
    ]
    recipe = out.parent / "recipe.yaml"
    recipe.write_text("train:\n  report_to: none\n")
    return subprocess.Popen(
        [sys.executable, "-m", "mmalign", "train", str(recipe), *args],
        env=env,
        cwd=out.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_steps(proc: subprocess.Popen, history: Path, n: int = 2, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if history.is_file() and len(history.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("training never started")


def test_sigterm_saves_a_checkpoint_at_the_step_boundary_and_exits_143(tiny_sd15, pair_manifest, tmp_path):
    out = tmp_path / "run"
    proc = _start(out, tiny_sd15, pair_manifest)
    _wait_for_steps(proc, out / "history.jsonl")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mmalign train: stopped by SIGTERM after step") and "train.resume=latest" in last
    assert "Traceback" not in err
    ckpts = ck.list_checkpoints(out)
    steps = [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(ckpts) == 1 and ck.checkpoint_step(ckpts[0]) == steps[-1]
    ck.read_checkpoint(ckpts[0])


SECOND_SIGNAL = """
import os, signal, sys, time
from mmalign.trainers.checkpoint import StopOnSignal
with StopOnSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    assert stop.signum == signal.SIGTERM  # the first one only asks to stop
    print("first handled", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
print("not reached")
"""


def test_a_second_signal_exits_at_once():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", SECOND_SIGNAL], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert (
        proc.stdout == "first handled\n" and "second SIGINT: exiting now, without a checkpoint" in proc.stderr
    )
