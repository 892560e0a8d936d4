"""Inversion-DPO seconds per step with the inversion cache on vs off and InPO's online recipe, beside Diffusion-DPO, in one process.

Each run goes through the real loop (`mmalign.trainers.loop.train`) on a tiny random SD1.5 pipeline, after a
warm-up run, so the three are measured under the same conditions side by side:

    python bench/bench_inversion_cache.py                     # 80-step grid, CFG 2 (the paper's settings)
    python bench/bench_inversion_cache.py --grid 10 --steps 20    # InPO's 10-step grid
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import write_pair_images  # noqa: E402

from mmalign.toy.tiny import build_tiny_sd15  # noqa: E402
from mmalign.trainers import load_config  # noqa: E402
from mmalign.trainers.loop import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", type=int, default=80, help="DDIM inversion grid (paper: 80)")
    parser.add_argument("--guidance", type=float, default=2.0, help="inverter CFG (paper: 2)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--pairs", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    build_tiny_sd15(tmp / "model")
    manifest = write_pair_images(tmp / "pairs", n=args.pairs)
    base = [
        f"model.pretrained={tmp / 'model'}",
        "model.resolution=16",
        f"data.source={manifest}",
        "train.batch_size=2",
        "train.report_to=none",
        "train.progress=false",
        "train.checkpoint_every=0",
        "train.scale_lr=false",
        "train.learning_rate=1e-4",
        f"train.max_steps={args.steps}",
    ]
    inversion = [
        "method.name=inversion_dpo",
        f"method.num_inversion_steps={args.grid}",
        f"method.inversion_guidance={args.guidance}",
    ]
    runs = [
        ("warm-up (not reported)", []),
        ("diffusion_dpo", []),
        ("inversion_dpo inverted_noise, cache on", inversion),
        ("inversion_dpo inverted_noise, cache off", [*inversion, "method.cache_inversions=false"]),
        (  # InPO: the current model inverts up to a continuous t every step; nothing is cacheable
            "inversion_dpo InPO (policy inverter, continuous t, eta 0.1, g = 1)",
            [
                *inversion,
                "method.inverter=policy",
                "method.timestep_sampling=continuous",
                "method.inversion_eta=0.1",
                "method.inversion_guidance=1.0",
                "method.cache_inversions=false",
            ],
        ),
    ]
    rows = {}
    for i, (name, extra) in enumerate(runs):
        cfg = load_config(
            None, [*base, *extra, f"train.output_dir={tmp}/{i}/run", f"data.cache_dir={tmp}/{i}/cache"]
        )
        summary = train(cfg).summary
        if i:
            rows[name] = {
                "s_per_step": round(summary["seconds"] / summary["steps"], 4),
                "inversions_built": summary["data"].get("inversions_built"),
            }
            print(json.dumps({"run": name, **rows[name]}), flush=True)
    on, off = (rows[f"inversion_dpo inverted_noise, cache {x}"]["s_per_step"] for x in ("on", "off"))
    dpo, inpo = rows["diffusion_dpo"]["s_per_step"], rows[runs[-1][0]]["s_per_step"]
    print(
        json.dumps(
            {
                "cache_speedup": round(off / on, 2),
                "cached_vs_dpo": round(on / dpo, 2),
                "inpo_vs_dpo": round(inpo / dpo, 2),
                "grid": args.grid,
                "guidance": args.guidance,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
