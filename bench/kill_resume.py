"""Kill -9 campaign (issue 14): SIGKILL a tiny toy training run at 30 exact points, resume each time with
``train.resume=latest``, and check that no finished checkpoint is ever lost and that the final trainable
weights equal an uninterrupted run's bit for bit.

The points: for each of the 5 checkpoint saves (steps 4, 8, 12, 16, 20 of 24; 6 pairs at batch 1, so most
saves are mid-epoch), a kill in the middle of the steps before it, at 4 places inside the save before its
folder is renamed into place (start, after the weights or the optimizer, after all files, after the
completeness marker), and 1 after (just renamed / while rotating / after rotating). The kill is a real
SIGKILL the process sends itself from ``mmalign.trainers.checkpoint.fault`` (``$MMALIGN_FAULT``). Each run
is a fork of this process (imports done once), so the campaign takes minutes, not one import per run.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/kill_resume.py [--work /tmp/kill_resume]

Prints one JSON line: kills, lost_checkpoints, resumes_at_expected_step, max_abs_diff, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

SAVES = (4, 8, 12, 16, 20)
EVERY, MAX_STEPS, LIMIT = 4, 24, 2
PRE = (("ckpt-begin",), ("ckpt-weights", "ckpt-optimizer"), ("ckpt-files",), ("ckpt-marker",))
POST = (
    "ckpt-renamed",
    "ckpt-done",
    "ckpt-rotating",
    "ckpt-rotating",
    "ckpt-done",
)  # rotation deletes from save 12 on


def kill_points() -> list[tuple[str, int]]:
    points = []
    for i, s in enumerate(SAVES):
        points.append(("step", s - 2 + (i % 2)))  # between checkpoints
        points += [(names[i % len(names)], s) for names in PRE]  # inside the save, before the rename
        points.append((POST[i], s))  # inside the save, after the rename
    return points


def write_pairs(root: Path, n: int = 6, size: int = 20) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        names = []
        for name, rgb in {"red": (220, 30, 30), "blue": (30, 30, 220)}.items():
            arr = np.full((size, size + 4, 3), 128, np.uint8)
            top, left = rng.integers(0, size // 2, 2)
            arr[top : top + size // 2, left : left + size // 2] = rgb
            Image.fromarray(arr).save(root / f"img{i}_{name}.png")
            names.append(f"img{i}_{name}.png")
        rows.append({"prompt": "a red square", "chosen": names[0], "rejected": names[1]})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "pairs.jsonl"


def run_forked(overrides: list[str], fault: str | None, log: Path) -> int:
    """Train in a forked child (stdout/stderr to ``log``); returns its exit code, -9 when SIGKILLed."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if fault:
                os.environ["MMALIGN_FAULT"] = fault
            from mmalign.trainers import load_config
            from mmalign.trainers.loop import train

            train(load_config(None, overrides))
        except BaseException as err:  # noqa: BLE001 - report anything, exit nonzero
            print(f"child failed: {type(err).__name__}: {err}", flush=True)
            code = 1
        sys.stdout.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def newest_usable(out: Path) -> int:
    from mmalign.trainers import checkpoint as ck

    root = out / "checkpoints"
    ck.recover(root)  # what the next run does first
    run_id = ck.read_run_id(out)
    try:
        found = ck.load_latest(root, run_id, 0, warn=lambda msg: None) if run_id else None
    except ck.CheckpointError:
        return -1
    return found.step if found else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/mmalign_kill_resume")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    from mmalign.toy.tiny import build_tiny_sd15

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.time()
    model = work / "tiny-sd15"
    build_tiny_sd15(model)
    manifest = write_pairs(work / "pairs")

    def overrides(out: Path, *extra: str) -> list[str]:
        return [
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
            "data.random_flip=true",
            f"train.max_steps={MAX_STEPS}",
            f"train.checkpoint_every={EVERY}",
            f"train.checkpoints_total_limit={LIMIT}",
            f"data.cache_dir={work / 'cache'}",
            *extra,
        ]

    straight = work / "straight"
    assert run_forked(overrides(straight), None, work / "straight.log") == 0, (
        work / "straight.log"
    ).read_text()[-2000:]
    run = work / "killed"
    log = work / "killed.log"
    kills = lost = expected_resumes = 0
    detail = []
    for point, at in kill_points():
        before = newest_usable(run) if run.exists() else 0
        code = run_forked(overrides(run, "train.resume=latest"), f"{point}@{at}", log)
        if code != -signal.SIGKILL:
            raise SystemExit(f"{point}@{at}: the run was not killed (exit {code}); see {log}")
        kills += 1
        finished_here = [s for s in SAVES if before < s < at] + ([at] if point in POST else [])
        expected = max([before, *finished_here])
        after = newest_usable(run)
        lost += after != expected
        expected_resumes += after == expected
        detail.append({"kill": f"{point}@{at}", "newest_checkpoint": after, "expected": expected})
    assert run_forked(overrides(run, "train.resume=latest"), None, log) == 0, log.read_text()[-2000:]
    final = run / f"checkpoints/checkpoint-{MAX_STEPS}/trainable.safetensors"
    from safetensors.torch import load_file

    a, b = load_file(straight / f"checkpoints/checkpoint-{MAX_STEPS}/trainable.safetensors"), load_file(final)
    max_diff = max((a[n] - b[n]).abs().max().item() for n in a)
    history = [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()]
    (work / "detail.json").write_text(json.dumps(detail, indent=1))
    print(
        json.dumps(
            {
                "kills": kills,
                "lost_checkpoints": lost,
                "resumes_at_expected_step": expected_resumes,
                "max_abs_diff": max_diff,
                "history_complete": history == list(range(1, MAX_STEPS + 1)),
                "seconds": round(time.time() - t0, 1),
                "detail": str(work / "detail.json"),
            }
        )
    )


if __name__ == "__main__":
    main()
