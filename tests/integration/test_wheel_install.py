"""A wheel install (not editable) ships the recipes and toy assets: build the wheel, install it into a fresh venv,
and from an unrelated directory run `mmalign --version`, `mmalign ls`, `mmalign cp` and a 2-step toy training."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import write_pair_images

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


@pytest.mark.slow
def test_wheel_ships_recipes_and_trains_from_an_unrelated_directory(tmp_path):
    src = tmp_path / "src"  # build from a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(
        ROOT,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(".git", "outputs", "build", "*.egg-info", "__pycache__", ".*cache"),
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        tmp_path,
        env,
    )
    wheel = next((tmp_path / "dist").glob("mmalign-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert (
        "mmalign/configs/toy/quickstart.yaml" in names
        and "mmalign/configs/sdxl/diffusion_dpo_lora.yaml" in names
    )
    assert "mmalign/toy/assets/toy-sd/unet/diffusion_pytorch_model.safetensors" in names

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
    python, mmalign = venv / "bin" / "python", venv / "bin" / "mmalign"
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], tmp_path, env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([str(python), "-c", "import mmalign; print(mmalign.__file__)"], elsewhere, env)
    assert str(venv) in where  # the wheel, not an editable checkout
    assert run([str(mmalign), "--version"], elsewhere, env).startswith("mmalign ")
    listing = run([str(mmalign), "ls"], elsewhere, env)
    assert "configs/toy/quickstart.yaml" in listing and "configs/sdxl/diffusion_dpo_lora.yaml" in listing
    run([str(mmalign), "cp", "toy/quickstart", "my_recipe.yaml"], elsewhere, env)
    assert (
        "mmalign/toy/assets/toy-sd" in (elsewhere / "my_recipe.yaml").read_text()
    )  # resolved against the package

    pairs = write_pair_images(elsewhere / "pairs", n=4, size=28)
    out = run(
        [
            str(mmalign),
            "train",
            "my_recipe.yaml",
            f"data.source={pairs}",
            "train.output_dir=run",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.progress=false",
            "data.cache=false",
            "model.resolution=32",
        ],
        elsewhere,
        env,
    )
    assert "done: 2 steps" in out
    assert (elsewhere / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
