"""Concurrent runs filling one shared latent / inversion cache lose none of each other's index entries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np, torch
    from PIL import Image
    from mmalign.data.cache import LatentCache
    from mmalign.data.inversion_cache import InversionCache
    from mmalign.data.pairs import PairRecord

    root, images, worker, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

    class SlowAdapter:  # stands in for a VAE/text encoder; the sleep makes the writers interleave
        vae = type("Vae", (), {"config": {"latent_channels": 1, "block_out_channels": [1, 1, 1]}})()

        def latent_moments(self, x):
            time.sleep(0.005)
            return x[:, :1, :2, :2] * 0 + x.mean(), x[:, :1, :2, :2] * 0 + 1
        def encode_prompts(self, prompts):
            return {"prompt_embeds": torch.stack([torch.full((2, 3), float(len(p))) for p in prompts])}

    records = []
    for i in range(n):  # pairs 0..n/2 are shared by every worker, the rest are this worker's own
        tag = i if i < n // 2 else 1000 * (worker + 1) + i
        paths = []
        for side in (0, 1):
            p = images / f"{tag}_{side}.png"
            if not p.exists():
                tmp = p.with_suffix(f".{worker}.tmp.png")
                Image.fromarray(np.full((8, 8, 3), (tag * 7 + side) % 256, np.uint8)).save(tmp)
                tmp.replace(p)
            paths.append(str(p))
        records.append(PairRecord(f"prompt {tag}", paths[0], paths[1], f"w{worker}:{i}"))
    cache = LatentCache(root, {"model": "fake"})
    keep, keys, skipped = cache.build(records, SlowAdapter(), resolution=8, random_flip=False, batch_size=1,
                                      shard_size=1, progress=False)
    inv = InversionCache(root, {"model": "fake"})
    inv.build([(k, lambda: (torch.zeros(1, 2, 2), {"c": torch.zeros(1)})) for k in keys],
              lambda x0, c: type("I", (), {"latents": x0[:, None].repeat(1, 2, 1, 1, 1)})(), batch_size=1,
              shard_size=1, progress=False)
    print("KEYS " + " ".join(keys))
""")


@pytest.mark.parametrize("workers", [3])
def test_concurrent_builders_lose_no_index_entry(tmp_path, workers):
    from safetensors import safe_open

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    images = tmp_path / "images"
    images.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "cache"), str(images), str(w), "10"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for w in range(workers)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    expected = {
        k
        for out, _ in outs
        for line in out.splitlines()
        if line.startswith("KEYS ")
        for k in line.split()[1:]
    }
    assert len(expected) == 5 + workers * 5  # 5 shared pairs + 5 own pairs per worker

    (latent_dir,) = [d for d in (tmp_path / "cache").iterdir() if d.is_dir() and d.name != "inversion"]
    index = json.loads((latent_dir / "index.json").read_text())
    assert set(index["pairs"]) == expected  # nothing lost
    for key, shard in index["pairs"].items():  # and every entry points at a shard holding it
        with safe_open(str(latent_dir / shard), framework="pt") as f:
            assert f"{key}.w.mean" in f.keys()
    assert len(index["text"]) == 5 + 1 + workers * 5  # prompts of the shared and own pairs, and ""

    (inv_dir,) = list((tmp_path / "cache" / "inversion").iterdir())
    inv_index = json.loads((inv_dir / "index.json").read_text())
    assert set(inv_index) == expected
    for key, shard in inv_index.items():
        with safe_open(str(inv_dir / shard), framework="pt") as f:
            assert f"{key}.x" in f.keys()
