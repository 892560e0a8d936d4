"""Host memory and time of `mmalign cache`'s model load: the denoiser built empty from its config vs loaded.

`mmalign cache` runs only the VAE and the text encoders; it used to load the whole pipeline. This builds a
pipeline of a bench_train_step.py preset (random weights, saved with save_pretrained in ``--disk-dtype``), then
loads it as the cache command does (``load_model(cfg.model, denoisers=...)``, no torch_dtype) in a fresh process
per mode, side by side:

    python bench/bench_cache_memory.py --preset tiny    # what the test runs
    python bench/bench_cache_memory.py --preset sdxl    # real SDXL shapes: 2.6B-parameter UNet, ~13 GB on disk
    python bench/bench_cache_memory.py --preset sdxl --disk-dtype bf16   # saved in half precision, as published

One JSON line per mode: peak resident memory of the process (``VmHWM``, Linux), load seconds, and the parameters the
denoiser holds in memory (0 when built empty); then a ratio line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

LOAD = """
import json, sys, time
import torch
from mmalign.trainers import load_config
from mmalign.pipelines import load_model
model = load_config(None, [f"model.pretrained={sys.argv[1]}"]).model
import diffusers, transformers  # imported before the clock starts: the load is what is timed
diffusers.StableDiffusionXLPipeline, diffusers.StableDiffusionPipeline, transformers.CLIPTextModel
start = time.perf_counter()
pipe, family, adapter = load_model(model, denoisers=sys.argv[2] == "loaded")
seconds = time.perf_counter() - start
unet = pipe.unet
print(json.dumps({
    "mode": sys.argv[2],
    # VmHWM: this process image's peak (ru_maxrss would carry the parent's peak across fork + exec)
    "peak_rss_gb": int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:"))) / 2**20,
    "load_seconds": seconds,
    "denoiser_params_in_memory": sum(p.numel() for p in unet.parameters() if p.device.type != "meta"),
    "denoiser_params": sum(p.numel() for p in unet.parameters()),
}))
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", default="tiny", help="a bench_train_step.py preset (tiny, sd15-small, sdxl)"
    )
    parser.add_argument("--model", help="an existing pipeline folder instead of building the preset")
    parser.add_argument(
        "--disk-dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="the dtype the built pipeline is saved in (published checkpoints are often half precision; "
        "from_pretrained without torch_dtype then upcasts them to fp32 in memory, where an fp32 file is mapped)",
    )
    args = parser.parse_args(argv)

    from bench_train_step import PRESETS, build_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            pipe = build_pipeline(PRESETS[args.preset], "cpu", torch.float32, Path(tmp))
            if args.disk_dtype == "bf16":
                pipe.to(torch.bfloat16)
            model = str(Path(tmp) / "model")
            pipe.save_pretrained(model, safe_serialization=True)
            del pipe
        rows = {}
        for mode in ("loaded", "empty"):  # each in its own process: peak memory is the process's own
            out = subprocess.run(
                [sys.executable, "-c", LOAD, model, mode], capture_output=True, text=True, check=True
            ).stdout
            rows[mode] = json.loads(out.strip().splitlines()[-1])
            print(
                json.dumps({"preset": args.preset, "disk_dtype": args.disk_dtype, **rows[mode]}), flush=True
            )
    ratio = {
        "peak_rss_empty_over_loaded": rows["empty"]["peak_rss_gb"] / rows["loaded"]["peak_rss_gb"],
        "load_seconds_empty_over_loaded": rows["empty"]["load_seconds"]
        / max(rows["loaded"]["load_seconds"], 1e-9),
    }
    print(json.dumps(ratio), flush=True)
    return {**rows, **ratio}


if __name__ == "__main__":
    main()
