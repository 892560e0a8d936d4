"""Diffusion-DPO training-step benchmark: latent/text-embedding cache on vs off, side by side in one run.

Both modes run the real data path (`PairDataset` decoding PNG files, or `CachedPairDataset` reading
safetensors shards), `prepare_pair_batch`, `compute_loss`, backward and an optimizer step, on a pipeline of
the requested architecture built in memory with random weights (no download):

    python bench/bench_train_step.py --preset tiny --steps 20            # CPU, seconds
    python bench/bench_train_step.py --preset sd15-small --steps 10      # CPU, SD-shaped VAE and UNet, 128 px
    python bench/bench_train_step.py --preset sdxl --device cuda --dtype bf16 --steps 10   # real SDXL sizes, 1024 px

Prints one JSON line per mode and a ratio line. Each row carries the hardware floor measured in the same run:
the FLOPs of one step's denoiser work (policy forward+backward and reference forward on the pair batch, counted
by torch.utils.flop_counter.FlopCounterMode from the model's shapes) divided by the matmul rate of this device
and dtype (a square matmul timed here), and ``floor_ratio`` = floor seconds / measured seconds per step.
Fast paths as in training: ``--compile regional|full``, ``--compile-mode``, ``--channels-last``,
``--attention-backend``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmalign.config import LoraConfig  # noqa: E402
from mmalign.data.cache import CachedPairDataset, LatentCache  # noqa: E402
from mmalign.data.pairs import PairDataset, collate_pairs, load_pairs  # noqa: E402
from mmalign.data.setup import prepare_pair_batch  # noqa: E402
from mmalign.pipelines import make_adapter  # noqa: E402
from mmalign.pipelines.fast import apply_fast_paths  # noqa: E402
from mmalign.toy.tokenizer import build_word_tokenizer  # noqa: E402
from mmalign.trainers.common import TrainModels  # noqa: E402
from mmalign.trainers.diffusion_dpo import DiffusionDPOConfig, compute_loss  # noqa: E402
from mmalign.trainers.loop import add_lora  # noqa: E402

WORDS = "a photo of red green blue yellow circle square triangle cat dog on the moon".split()

# Architectures (random weights): the real SDXL / SD1.5 shapes, and small ones that fit a CPU benchmark.
PRESETS = {
    "tiny": dict(
        family="sd15",
        res=32,
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=16,
        ),
        vae=dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    ),
    "sd15-small": dict(
        family="sd15",
        res=128,
        unet=dict(
            block_out_channels=(64, 128, 256, 256),
            layers_per_block=1,
            cross_attention_dim=256,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            norm_num_groups=32,
        ),
        vae=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, norm_num_groups=32),
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4),
    ),
    "sdxl-small": dict(
        family="sdxl",
        res=64,
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 1),
            attention_head_dim=(2, 4),
            cross_attention_dim=64,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=16,
        ),
        vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text2=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=32,
        ),
    ),
    "sdxl": dict(
        family="sdxl",
        res=1024,
        unet=dict(
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            sample_size=128,
        ),
        vae=dict(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            norm_num_groups=32,
            scaling_factor=0.13025,
        ),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        text2=dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            projection_dim=1280,
        ),
    ),
}


def build_pipeline(preset: dict, device: str, dtype: torch.dtype, tmp: Path):
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = build_word_tokenizer(WORDS, tmp / "tok", model_max_length=77)
    n_vae = len(preset["vae"]["block_out_channels"])
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * n_vae,
            up_block_types=("UpDecoderBlock2D",) * n_vae,
            **preset["vae"],
        )
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **preset["unet"])

        def text(cfg, cls):
            return cls(
                CLIPTextConfig(
                    vocab_size=len(tok),
                    max_position_embeddings=77,
                    bos_token_id=len(tok) - 2,
                    eos_token_id=len(tok) - 1,
                    pad_token_id=len(tok) - 1,
                    **cfg,
                )
            )

        te = text(preset["text"], CLIPTextModel)
        te2 = text(preset["text2"], CLIPTextModelWithProjection) if "text2" in preset else None
    sched = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False
    )
    for module in (te, te2, unet):
        if module is not None:
            module.to(dtype)
    if preset["family"] == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=te,
            text_encoder_2=te2,
            tokenizer=tok,
            tokenizer_2=tok,
            unet=unet,
            scheduler=sched,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=te,
            tokenizer=tok,
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return pipe


def write_pairs(root: Path, n: int, res: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        for side in ("w", "l"):
            img = rng.integers(0, 255, (res, res + res // 4, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / f"{i}_{side}.png")
        rows.append(
            json.dumps(
                {
                    "prompt": f"a photo of {WORDS[3 + i % 4]} {WORDS[7 + i % 3]}",
                    "chosen": f"{i}_w.png",
                    "rejected": f"{i}_l.png",
                }
            )
        )
    (root / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    return root / "pairs.jsonl"


def run(args) -> list[dict]:
    preset = PRESETS[args.preset]
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    res = args.resolution or preset["res"]
    results = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        pipe = build_pipeline(preset, args.device, dtype, tmp)
        adapter = make_adapter(pipe, preset["family"])
        unet = pipe.unet
        unet.requires_grad_(False)
        add_lora(unet, LoraConfig(rank=args.rank))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        unet.train()
        opt = torch.optim.AdamW(params, lr=1e-5)
        models = TrainModels(adapter, unet)
        n_pairs = args.batch * (args.steps + args.warmup)
        records, _ = load_pairs(write_pairs(tmp, n_pairs, res))
        joint = preset["family"] == "sdxl"

        t0 = time.perf_counter()
        cache = LatentCache(tmp / "cache", {"bench": args.preset, "resolution": res})
        records_c, keys, _ = cache.build(
            records,
            adapter,
            resolution=res,
            random_flip=True,
            joint_crop=joint,
            batch_size=args.batch,
            progress=False,
        )
        sync(device)
        cache_build_s = time.perf_counter() - t0
        rate = matmul_rate(device, dtype)
        first = next(
            iter(
                torch.utils.data.DataLoader(
                    CachedPairDataset(records_c, keys, cache, random_flip=True),
                    batch_size=args.batch,
                    collate_fn=collate_pairs,
                )
            )
        )
        step_flops = count_step_flops(first, adapter, cache, res, device, dtype, models, opt)
        # after counting: the floor is the eager step's work, without checkpointing's recomputed forward
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        apply_fast_paths(
            unet,
            compile=args.compile,
            compile_mode=args.compile_mode,
            channels_last=args.channels_last,
            attention_backend=args.attention_backend,
        )
        floor_s = step_flops / rate
        datasets = {
            "uncached": PairDataset(records, res, random_flip=True, joint_crop=joint),
            "cached": CachedPairDataset(records_c, keys, cache, random_flip=True),
        }
        for mode in args.modes:
            ds = datasets[mode]
            loader = torch.utils.data.DataLoader(
                ds, batch_size=args.batch, collate_fn=collate_pairs, shuffle=False
            )
            c = cache if mode == "cached" else None
            times = []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for i, raw in enumerate(loader):
                sync(device)
                t = time.perf_counter()
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    batch = prepare_pair_batch(raw, adapter, c, 0.0, res, device)
                    loss, _ = compute_loss(batch, models, DiffusionDPOConfig())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(device)
                if i == 0:
                    first_s = time.perf_counter() - t  # includes compilation with --compile
                if i >= args.warmup:
                    times.append(time.perf_counter() - t)
            if args.profile and mode == "cached":
                profile_steps(loader, adapter, c, res, device, dtype, models, opt)
            step_s = sum(times) / len(times)
            row = {
                "preset": args.preset,
                "mode": mode,
                "device": device_name(device),
                "dtype": args.dtype,
                "resolution": res,
                "pairs_per_step": args.batch,
                "steps": len(times),
                "seconds_per_step": round(step_s, 4),
                "first_step_s": round(first_s, 3),
                "steps_per_s": round(1 / step_s, 3),
                "pairs_per_s": round(args.batch / step_s, 3),
                "compile": args.compile,
                "channels_last": args.channels_last,
                "attention_backend": args.attention_backend,
                "gradient_checkpointing": args.gradient_checkpointing,
                "step_tflop": round(step_flops / 1e12, 6),
                "matmul_tflops": round(rate / 1e12, 4),
                "floor_s_per_step": round(floor_s, 6),
                "floor_pairs_per_s": round(args.batch / floor_s, 3),
                "floor_ratio": round(floor_s / step_s, 4),
            }
            if device.type == "cuda":
                row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if mode == "cached":
                row["cache_build_s"] = round(cache_build_s, 2)
            print(json.dumps(row), flush=True)
            results.append(row)
    if len(results) == 2:
        ratio = results[0]["seconds_per_step"] / results[1]["seconds_per_step"]
        print(json.dumps({"speedup_cached_vs_uncached": round(ratio, 2)}))
    return results


def count_step_flops(raw, adapter, cache, res, device, dtype, models, opt) -> int:
    """FLOPs of one step's denoiser work on ``raw`` (cached latents and embeddings: no encoder FLOPs), counted by
    FlopCounterMode: policy forward+backward and reference forward, as aten ops with their shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        batch = prepare_pair_batch(raw, adapter, cache, 0.0, res, device)
        with FlopCounterMode(display=False) as counter:
            loss, _ = compute_loss(batch, models, DiffusionDPOConfig())
            loss.backward()
    opt.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_rate(
    device: torch.device, dtype: torch.dtype, n: int | None = None, seconds: float = 1.0
) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` on ``device``: the rate the floor divides by (8192 on GPU, 512 on CPU)."""
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        iters += 10
        sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def profile_steps(loader, adapter, cache, res, device, dtype, models, opt, n: int = 2) -> None:
    """torch.profiler over ``n`` steps: the ops that take the time, and on CUDA the GPU-busy fraction (kernel time
    summed over the profiled steps / their wall time; below 1 = the GPU waits for the host)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for i, raw in enumerate(loader):
            if i >= n:
                break
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                batch = prepare_pair_batch(raw, adapter, cache, 0.0, res, device)
                loss, _ = compute_loss(batch, models, DiffusionDPOConfig())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
    wall_us = (time.perf_counter() - t0) * 1e6
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    print(averages.table(sort_by=key, row_limit=18, max_name_column_width=60), flush=True)
    if device.type == "cuda":
        kernel_us = sum(e.self_device_time_total for e in averages)
        print(
            json.dumps({"profile_steps": n, "gpu_busy_fraction": round(kernel_us / wall_us, 3)}), flush=True
        )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="print a torch.profiler table of 2 cached steps"
    )
    parser.add_argument("--compile", choices=["none", "regional", "full"], default="none")
    parser.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        default="default",
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--attention-backend", choices=["sdpa", "xformers"], default="sdpa")
    parser.add_argument("--modes", nargs="+", default=["uncached", "cached"], choices=["uncached", "cached"])
    run(parser.parse_args())


if __name__ == "__main__":
    main()
