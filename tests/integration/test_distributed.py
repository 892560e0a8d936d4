"""A real 2-process gloo group on CPU (torchrun), not `accelerate launch --cpu`, which starts one process."""

import json
import os
import subprocess
import sys

import pytest
from conftest import write_pair_images


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_keep_replicas_identical(tiny_sd15, tmp_path):
    manifest = write_pair_images(tmp_path / "pairs", n=8)
    (tmp_path / "run.yaml").write_text("{}\n")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "mmalign",
        "train",
        str(tmp_path / "run.yaml"),
        f"model.pretrained={tiny_sd15}",
        "model.resolution=16",
        f"data.source={manifest}",
        f"train.output_dir={tmp_path / 'out'}",
        "train.max_steps=3",
        "train.batch_size=2",
        "train.report_to=none",
        "train.progress=false",
        "train.learning_rate=1e-3",
        "train.scale_lr=false",
        "lora.rank=2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    (tmp_path / "torchrun.log").write_text(proc.stdout + proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error:" in line]
    assert proc.returncode == 0, (
        f"log: {tmp_path / 'torchrun.log'}\n" + "\n".join(errors[:20]) + "\n" + proc.stderr[-2000:]
    )
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["replicas_identical"] and len(summary["replica_checksums"]) == 2
    assert summary["steps"] == 3
