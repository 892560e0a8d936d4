"""``mmalign cache``: fills the cache `mmalign train` reads, in the recipe's precision unless --dtype says otherwise."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from mmalign.cli import main


def text_dtypes(cache_dir):
    dtypes = set()
    for shard in cache_dir.rglob("text-*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            dtypes |= {str(f.get_tensor(k).dtype) for k in f.keys()}
    return dtypes


@pytest.mark.parametrize("dtype, expected", [(None, "torch.float32"), ("bf16", "torch.bfloat16")])
def test_cache_command_dtype(tiny_sd15, pair_manifest, tmp_path, dtype, expected):
    config = tmp_path / "cfg.yaml"
    config.write_text("method:\n  name: diffusion_dpo\n")
    args = [
        "cache",
        str(config),
        f"model.pretrained={tiny_sd15}",
        "model.resolution=16",
        f"data.source={pair_manifest}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.output_dir={tmp_path / 'run'}",
        "train.progress=false",
        "--device",
        "cpu",
    ]
    if dtype:
        args += ["--dtype", dtype]
    assert main(args) == 0
    assert text_dtypes(tmp_path / "cache") == {expected}
    assert list((tmp_path / "cache").rglob("latents-*.safetensors"))
