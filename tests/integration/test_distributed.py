"""A real 2-process gloo group on CPU (torchrun), not `accelerate launch --cpu`, which starts one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_pair_images


def torchrun(port: int) -> list[str]:
    """The command that starts 2 processes of what follows it on this machine (a real gloo group on CPU)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
    ]


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
        *torchrun(free_port()),
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


def accelerate_env(config: str, port: int) -> dict[str, str]:
    """The environment ``accelerate launch --config_file CONFIG --num_processes 2`` gives its processes, built by
    accelerate's own launcher code (mixed precision off: the comparison is of gradient reduction, in fp32)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = ["--config_file", config, "--num_processes", "2", "--mixed_precision", "no"]
    args = launch_command_parser().parse_args([*argv, "--main_process_port", str(port), "worker.py"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, mode, distributed_type, tol",
    [
        ("ddp_multi_gpu", "lora", "MULTI_CPU", 2e-5),  # measured 6.4e-6
        ("fsdp", "lora", "FSDP", 2e-5),
        ("fsdp", "full", "FSDP", 2e-5),
    ],
)
def test_config_two_processes_match_one_process_gradients(
    tiny_sd15, tmp_path, config, mode, distributed_type, tol
):
    """A shipped accelerate config, 2 gloo processes (torchrun) x 2 pairs vs 1 process x 4 pairs: two DPO steps,
    the same gradients at each step (fp32 reduction order). The FSDP config runs accelerate's FSDP2 path
    (fsdp_on_cpu.py): sharded weights, gradients gathered from their shards for the comparison."""
    from pathlib import Path

    import dist_grads
    import torch

    from mmalign.trainers.loop import _reset_single_process_state

    config_path = Path(__file__).resolve().parents[2] / f"mmalign/configs/accelerate/{config}.yaml"
    port = free_port()
    env = {**accelerate_env(str(config_path), port), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    worker = Path(dist_grads.__file__)
    cmd = torchrun(port)
    proc = subprocess.run(
        [*cmd, str(worker), str(tiny_sd15), str(tmp_path / "two"), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the workers: the same kernels' summation order
    try:
        _reset_single_process_state()
        dist_grads.main(str(tiny_sd15), str(tmp_path / "one"), mode)
    finally:
        torch.set_num_threads(threads)
        _reset_single_process_state()
    one, two = (torch.load(tmp_path / d / "grads.pt") for d in ("one", "two"))
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert two["distributed_type"] == f"DistributedType.{distributed_type}"
    assert (one["sharded"], two["sharded"]) == (False, config == "fsdp")  # FSDP2: DTensor shards
    assert len(one["grads"]) == len(two["grads"]) == dist_grads.STEPS
    worst = 0.0
    for step_one, step_two in zip(one["grads"], two["grads"]):
        assert step_one.keys() == step_two.keys() and len(step_one) > 0
        for name, ref in step_one.items():
            assert ref.abs().max() > 0, name
            err = ((step_two[name] - ref).abs().max() / ref.abs().max()).item()
            assert err < tol, f"{name}: off by {err:.3g} of its largest entry"
            worst = max(worst, err)
    print(f"{config}/{mode}: worst gradient error {worst:.3g} of a tensor's largest entry")


def test_fsdp_config_launches_fsdp2():
    """The launch environment the shipped FSDP config gives its processes (accelerate's own launcher code):
    FSDP2, wrapping the block classes each model names in ``_no_split_modules`` (any family). The tests around
    this one run that path (fsdp_on_cpu.py)."""
    config = Path(__file__).resolve().parents[2] / "mmalign/configs/accelerate/fsdp.yaml"
    env = accelerate_env(str(config), free_port())
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env  # accelerate then wraps the model's _no_split_modules


def _train_two_processes(config: Path, out: Path, overrides: list[str], shim: bool) -> None:
    """``accelerate launch --config_file CONFIG --num_processes 2 -m mmalign train`` on 2 gloo processes."""
    port = free_port()
    env = {**accelerate_env(str(config), port), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    entry = [str(Path(__file__).with_name("fsdp_on_cpu.py"))] if shim else ["-m", "mmalign"]
    cmd = torchrun(port)
    proc = subprocess.run(
        [*cmd, *entry, "train", *overrides, f"train.output_dir={out}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_full_finetune_checkpoints_resume_and_export(tiny_sd15, tmp_path):
    """`mmalign train` under the shipped FSDP config (accelerate's FSDP2 path on 2 gloo processes, fsdp_on_cpu.py),
    full fine-tuning: checkpoints hold full tensors, a run resumed from the uninterrupted run's step-2 checkpoint
    ends where that run does, the export loads with diffusers, and the sharded checkpoint resumes in one process."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    config = Path(__file__).resolve().parents[2] / "mmalign/configs/accelerate/fsdp.yaml"
    manifest = write_pair_images(tmp_path / "pairs", n=8)
    (tmp_path / "run.yaml").write_text(
        "train:\n  validation_prompts: ['a red square']\n  validation_steps: 2\n  validation_every: 2\n"
    )
    common = [
        str(tmp_path / "run.yaml"),
        f"model.pretrained={tiny_sd15}",
        "model.resolution=16",
        f"data.source={manifest}",
        "lora.enabled=false",
        "train.batch_size=2",
        "train.learning_rate=1e-4",
        "train.scale_lr=false",
        "train.report_to=none",
        "train.progress=false",
        "train.checkpoint_every=2",
    ]
    _train_two_processes(config, tmp_path / "a", [*common, "train.max_steps=4"], shim=True)
    halfway = tmp_path / "a/checkpoints/checkpoint-2"  # b: a run that stopped at step 2, resumed to step 4
    _train_two_processes(
        config, tmp_path / "b", [*common, "train.max_steps=4", f"train.resume={halfway}"], shim=True
    )

    summary = json.loads((tmp_path / "a/summary.json").read_text())
    assert summary["sharded"] and summary["num_processes"] == 2 and summary["steps"] == 4
    assert (tmp_path / "a/validation/step-000002.png").is_file()
    start = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").state_dict()
    a, b = (
        load_file(tmp_path / run / "checkpoints/checkpoint-4/trainable.safetensors") for run in ("a", "b")
    )
    assert a.keys() == b.keys() == start.keys()  # full tensors, every weight, under the diffusers names
    assert all(a[k].shape == start[k].shape for k in a)
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-5  # it trained
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run left the uninterrupted one"
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "a/final/unet").state_dict()
    assert all(torch.equal(exported[k], a[k]) for k in a)
    a_opt = load_file(tmp_path / "a/checkpoints/checkpoint-4/optimizer.safetensors")
    assert {t.shape for t in a_opt.values() if t.dim() > 0} <= {t.shape for t in a.values()}  # gathered

    # the same checkpoint continues in a single process (no FSDP): checkpoints do not depend on the sharding
    from mmalign.trainers import load_config
    from mmalign.trainers.loop import _reset_single_process_state, train

    resume = tmp_path / "a/checkpoints/checkpoint-4"
    overrides = [
        *common[1:],
        "train.max_steps=5",
        f"train.resume={resume}",
        f"train.output_dir={tmp_path / 'one'}",
    ]
    _reset_single_process_state()
    try:
        result = train(load_config(common[0], overrides))
    finally:
        _reset_single_process_state()
    assert result.summary["steps"] == 5 and not result.summary["sharded"]


def test_deepspeed_is_refused_before_training(tiny_sd15, tmp_path, monkeypatch):
    """ZeRO's partitioned optimizer state does not fit mmalign's checkpoints: refused at start, not at the
    first checkpoint (exit 2 through the CLI)."""
    from mmalign.config import ConfigError
    from mmalign.trainers import load_config
    from mmalign.trainers.loop import train

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cfg = load_config(None, [f"model.pretrained={tiny_sd15}", f"train.output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="DeepSpeed.*fsdp.yaml"):
        train(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fsdp_lora_run_exports_the_trained_adapter(tiny_sd15, tmp_path):
    """LoRA under the FSDP config (2 gloo processes): the exported LoRA loads into the stock pipeline and holds
    the weights of the final checkpoint (gathered from both processes' shards)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    config = Path(__file__).resolve().parents[2] / "mmalign/configs/accelerate/fsdp.yaml"
    manifest = write_pair_images(tmp_path / "pairs", n=4)
    (tmp_path / "run.yaml").write_text("{}\n")
    overrides = [
        str(tmp_path / "run.yaml"),
        f"model.pretrained={tiny_sd15}",
        "model.resolution=16",
        f"data.source={manifest}",
        "lora.rank=2",
        "train.batch_size=1",
        "train.max_steps=2",
        "train.learning_rate=1e-3",
        "train.scale_lr=false",
        "train.report_to=none",
        "train.progress=false",
    ]
    _train_two_processes(config, tmp_path / "out", overrides, shim=True)
    assert json.loads((tmp_path / "out/summary.json").read_text())["sharded"]
    trained = load_file(tmp_path / "out/checkpoints/checkpoint-2/trainable.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None)
    pipe.load_lora_weights(tmp_path / "out/final")
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert len(loaded) == len(trained) > 0
    assert any(v.abs().max() > 0 for n, v in trained.items() if "lora_B" in n)  # trained away from B = 0
    for name, value in trained.items():
        assert torch.equal(loaded[name.replace(".default.", ".default_0.")], value), name


@pytest.mark.slow
def test_sharded_resume_reads_only_each_process_rows():
    """A resume under FSDP2 reads each process's rows of every stored tensor and no whole tensor, with no
    collective, and those rows are the shards exactly (uneven ones, and one the second process holds none of):
    bench/bench_resume_memory.py at 10 MB on 2 gloo processes (the sliced path only; the bench's default runs the
    previous scatter path beside it)."""
    from conftest import load_bench

    row = load_bench("bench_resume_memory").main(["--gb", "0.01", "--procs", "2", "--modes", "sliced"])
    assert row["same_weights"] and row["procs"] == 2
    assert row["sliced_whole_tensor_reads"] == [0, 0]
    assert len(row["sliced_seconds"]) == 2 and len(row["sliced_file_pages_mb"]) == 2
