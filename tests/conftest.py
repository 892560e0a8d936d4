"""Shared fixtures: tiny pipelines saved to disk (the real from_pretrained path) and tiny pair data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    from mmalign.toy.tiny import build_tiny_sd15

    path = tmp_path_factory.mktemp("tiny-sd15")
    build_tiny_sd15(path)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from mmalign.toy.tiny import build_tiny_sdxl

    path = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl(path)
    return path


def write_pair_images(root: Path, n: int = 4, size: int = 20) -> Path:
    """n pairs of small PNGs (a coloured square on grey; the winner red) and a JSONL manifest."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    for i in range(n):
        paths = []
        for name, rgb in colours.items():
            arr = np.full((size, size + 4, 3), 128, np.uint8)
            top, left = rng.integers(0, size // 2, 2)
            arr[top : top + size // 2, left : left + size // 2] = rgb
            p = root / f"img{i}_{name}.png"
            Image.fromarray(arr).save(p)
            paths.append(p.name)
        rows.append(
            {
                "prompt": "a red square" if i % 2 == 0 else "a photo of a red square",
                "chosen": paths[0],
                "rejected": paths[1],
            }
        )
    manifest = root / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture(scope="session")
def pair_manifest(tmp_path_factory) -> Path:
    return write_pair_images(tmp_path_factory.mktemp("pairs"))


def card_code(final: Path) -> dict:
    """Run the Python lines of a run's model card (``final/README.md``) on ``final``; returns their namespace
    (``pipe``). A line sampling an image is left out."""
    text = (final / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    code = "\n".join(line for line in code.splitlines() if not line.startswith("image = "))
    namespace: dict = {}
    exec(code.replace("path/to/this/folder", str(final)), namespace)
    return namespace


def card_commands(final: Path) -> list:
    """Every ``mmalign ...`` command of a run's model card, parsed by the CLI's own parser (a wrong flag fails)."""
    import re
    import shlex

    from mmalign.cli import build_parser

    text = (final / "README.md").read_text()
    found = re.findall(r"^(mmalign [^\n`]+)|`(mmalign [^`]+)`", text, re.M)
    assert found, "the model card names no mmalign command"
    return [build_parser().parse_args(shlex.split(line or inline)[1:]) for line, inline in found]


def assert_only_trainable_changed(result, pretrained: dict) -> tuple[int, int]:
    """Every trainable weight of ``result.denoiser`` moved from its initial value; every frozen one still equals
    ``pretrained`` as stored in its dtype (names with peft's ``.base_layer`` mapped back). Returns (trainable,
    frozen) counts."""
    import torch

    trainable = frozen = 0
    for name, param in result.denoiser.named_parameters():
        if param.requires_grad:
            trainable += 1
            assert not torch.equal(param.detach().cpu(), result.initial_trainable[name]), (
                f"{name} did not change"
            )
        else:
            frozen += 1
            stored = pretrained[name.replace(".base_layer", "")].to(param.dtype)  # (train.frozen_dtype)
            assert torch.equal(param.detach().cpu(), stored), f"frozen {name} changed"
    return trainable, frozen


def load_bench(name: str):
    """``bench/<name>.py`` as a module (bench/ is scripts, not a package): for the tests of its tiny modes."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
