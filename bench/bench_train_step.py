"""Diffusion-DPO training-step benchmark: latent/text-embedding cache on vs off, side by side in one run.

Both modes run the real data path (`PairDataset` decoding PNG files, or `CachedPairDataset` reading
safetensors shards), `prepare_pair_batch`, `compute_loss`, backward and an optimizer step, on a pipeline of
the requested architecture built in memory with random weights (no download):

    python bench/bench_train_step.py --preset tiny --steps 20            # CPU, seconds
    python bench/bench_train_step.py --preset sd15-small --steps 10      # CPU, SD-shaped VAE and UNet, 128 px
    python bench/bench_train_step.py --preset sdxl --device cuda --dtype bf16 --steps 10   # real SDXL sizes, 1024 px

Prints one JSON line per mode and a ratio line. Each row carries the hardware floor measured in the same run:
the FLOPs of one step's denoiser work (policy forward+backward and reference forward on the pair batch, counted
with torch.utils.flop_counter's formulas from the model's shapes) divided by the matmul rate of this device
and dtype (a square matmul timed here), and ``floor_ratio`` = floor seconds / measured seconds per step.
Fast paths as in training: ``--compile regional|full``, ``--compile-mode``, ``--channels-last``,
``--attention-backend``; ``--compile none regional`` times eager and then compiled in the same process.
``--gradient-checkpointing --checkpoint-policy recompute_all save_attention save_matmuls`` times each
checkpointing policy in the same process (peak memory per row on CUDA).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmalign.config import LoraConfig, TrainConfig  # noqa: E402
from mmalign.data.cache import CachedPairDataset, LatentCache  # noqa: E402
from mmalign.data.inversion_cache import InversionCache  # noqa: E402
from mmalign.data.inversion_pairs import (  # noqa: E402
    InversionPairDataset,
    InversionSpec,
    build_inversion_cache,
    inversion_fingerprint,
    method_grid,
    prepare_inversion_batch,
)
from mmalign.data.pairs import PairDataset, collate_pairs, load_pairs  # noqa: E402
from mmalign.data.setup import prepare_pair_batch  # noqa: E402
from mmalign.pipelines import make_adapter  # noqa: E402
from mmalign.pipelines.fast import apply_fast_paths, enable_checkpointing  # noqa: E402
from mmalign.toy.tokenizer import build_word_tokenizer  # noqa: E402
from mmalign.trainers import inversion_dpo  # noqa: E402
from mmalign.trainers.common import TrainModels  # noqa: E402
from mmalign.trainers.diffusion_dpo import DiffusionDPOConfig, compute_loss  # noqa: E402
from mmalign.trainers.inversion_dpo import InversionDPOConfig  # noqa: E402
from mmalign.trainers.loop import add_lora, build_optimizer  # noqa: E402
from mmalign.trainers.master_weights import MasterWeights  # noqa: E402

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
        for side in (
            "w",
            "l",
        ):  # smooth random images: PNG-encoding 1024 px noise would take most of a GPU run
            img = Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8))
            img.resize((res + res // 4, res), Image.BILINEAR).save(root / f"{i}_{side}.png")
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
        reference = None
        if args.full:
            # full fine-tuning as the loop does it: fp32 trained weights (the optimizer's masters) under
            # autocast, and a frozen copy in the compute dtype as the reference
            reference = copy.deepcopy(unet).requires_grad_(False).to(dtype).eval()
            unet.float().requires_grad_(True)
        else:
            unet.requires_grad_(False)
            add_lora(unet, LoraConfig(rank=args.rank))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = (
                p.data.float()
            )  # as the loop: trained weights fp32 (peft made the LoRA in the UNet's dtype)
        unet.train()
        # the optimizer step alone, fused vs foreach, before the run's own optimizer state exists
        optimizer_row = time_optimizer_steps(params, args.trainable_dtype, device)
        opt = make_optimizer(params, args.trainable_dtype)
        models = TrainModels(adapter, unet, reference_denoiser=reference)
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
        if args.gradient_checkpointing:  # recompute_all while counting: count_flops subtracts whole forwards
            unet.enable_gradient_checkpointing()
        # the floor is the step's work without checkpointing's recomputed forward (counted in eager mode)
        step_flops = count_step_flops(first, adapter, cache, res, device, dtype, models, opt)
        floor_s = step_flops / rate
        datasets = {
            "uncached": PairDataset(records, res, random_flip=True, joint_crop=joint),
            "cached": CachedPairDataset(records_c, keys, cache, random_flip=True),
        }
        inversion, inversion_build_s = None, None
        if "inversion" in args.modes:
            datasets["inversion"], inversion, inversion_build_s = warm_inversion_cache(
                records_c, keys, cache, adapter, models, res, device, args.inversion_steps
            )
        for k, how in enumerate(args.compile):  # e.g. none then regional: eager and compiled in one process
            for net in (unet, reference):
                if net is not None:
                    apply_fast_paths(
                        net,
                        compile=how,
                        compile_mode=args.compile_mode,
                        channels_last=args.channels_last and k == 0,
                        attention_backend=args.attention_backend,
                    )
            for policy in args.checkpoint_policy:
                if args.gradient_checkpointing:
                    enable_checkpointing(unet, policy)
                for mode in args.modes:
                    ds = datasets[mode]
                    loader = torch.utils.data.DataLoader(
                        ds, batch_size=args.batch, collate_fn=collate_pairs, shuffle=False
                    )
                    c = None if mode == "uncached" else cache
                    inv = inversion if mode == "inversion" else None
                    times = []
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    for i, raw in enumerate(loader):
                        sync(device)
                        t = time.perf_counter()
                        dpo_step(raw, adapter, c, res, device, dtype, models, opt, inv)
                        if i == 0:
                            first_s = time.perf_counter() - t  # includes compilation with --compile
                        if i >= args.warmup:
                            times.append(time.perf_counter() - t)
                    if args.profile and mode != "uncached":
                        profile_steps(loader, adapter, c, res, device, dtype, models, opt, inv)
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
                        "step_times_s": [round(x, 4) for x in times],
                        "first_step_s": round(first_s, 3),
                        "steps_per_s": round(1 / step_s, 3),
                        "pairs_per_s": round(args.batch / step_s, 3),
                        "compile": how,
                        "channels_last": args.channels_last,
                        "attention_backend": args.attention_backend,
                        "gradient_checkpointing": args.gradient_checkpointing,
                        "checkpoint_policy": policy if args.gradient_checkpointing else None,
                        "trained": f"{'full' if args.full else f'lora r{args.rank}'} {args.trainable_dtype}",
                        "trainable_params_m": round(sum(p.numel() for p in params) / 1e6, 2),
                        "step_tflop": sig(step_flops / 1e12),
                        "matmul_tflops": sig(rate / 1e12),
                        "floor_s_per_step": sig(floor_s),
                        "floor_pairs_per_s": round(args.batch / floor_s, 3),
                        "floor_ratio": sig(floor_s / step_s, 4),
                        **optimizer_row,
                    }
                    if device.type == "cuda":
                        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    if mode != "uncached":
                        row["cache_build_s"] = round(cache_build_s, 2)
                    if mode == "inversion":  # the same denoiser work as a Diffusion-DPO step: the same floor
                        row["method"] = f"inversion_dpo (warm cache, {args.inversion_steps}-step grid)"
                        row["inversion_cache_build_s"] = round(inversion_build_s, 2)
                    print(json.dumps(row), flush=True)
                    results.append(row)

    def label(row: dict) -> str:
        return row["compile"] + (f"/{row['checkpoint_policy']}" if len(args.checkpoint_policy) > 1 else "")

    for mode in args.modes:  # the first compile setting (and policy) is the baseline of the others
        rows = [r for r in results if r["mode"] == mode]
        for row in rows[1:]:
            ratio = rows[0]["seconds_per_step"] / row["seconds_per_step"]
            print(json.dumps({f"speedup_{label(row)}_vs_{label(rows[0])}_{mode}": round(ratio, 3)}))
    for how in args.compile:
        by_mode = {  # under the first checkpoint policy
            r["mode"]: r["seconds_per_step"]
            for r in results
            if r["compile"] == how and r["checkpoint_policy"] in (None, args.checkpoint_policy[0])
        }
        if "uncached" in by_mode and "cached" in by_mode:
            ratio = by_mode["uncached"] / by_mode["cached"]
            print(json.dumps({f"speedup_cached_vs_uncached_{how}": round(ratio, 2)}))
        if "cached" in by_mode and "inversion" in by_mode:  # issue 16's target: <= 1.3
            ratio = by_mode["inversion"] / by_mode["cached"]
            print(json.dumps({f"inversion_step_over_dpo_step_{how}": round(ratio, 3)}))
    return results


def make_optimizer(params: list, trainable_dtype: str, fused: bool | None = None) -> torch.optim.Optimizer:
    """The loop's AdamW (``build_optimizer`` with the default train config: the fused kernel unless ``fused``
    says otherwise); with ``trainable_dtype`` bf16, behind fp32 masters (``train.trainable_dtype: bf16``)."""
    if trainable_dtype == "bf16":
        return MasterWeights(params, lambda masters: build_optimizer(masters, TrainConfig(), 1e-5, fused))
    return build_optimizer(params, TrainConfig(), 1e-5, fused)


def time_optimizer_steps(params: list, trainable_dtype: str, device: torch.device, steps: int = 3) -> dict:
    """The optimizer step alone, torch's fused AdamW kernel (the loop's) vs its multi-tensor ``foreach`` path (torch's
    default), on the trained weights with random gradients: one warm-up step and ``steps`` timed each. Run before
    the timed training steps (the weights it moves are random either way); each optimizer is freed after."""
    row = {"optimizer_params_m": round(sum(p.numel() for p in params) / 1e6, 2)}
    for p in params:
        p.grad = torch.randn_like(p)
    for fused in (True, False):
        opt = make_optimizer(params, trainable_dtype, fused)
        opt.step()
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            opt.step()
        sync(device)
        row[f"optimizer_step_s_{'fused' if fused else 'foreach'}"] = round(
            (time.perf_counter() - t) / steps, 4
        )
        del opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for p in params:
        p.grad = None
    row["optimizer_fused_speedup"] = round(row["optimizer_step_s_foreach"] / row["optimizer_step_s_fused"], 2)
    return row


def warm_inversion_cache(records, keys, cache, adapter, models, res, device, steps: int):
    """Inversion-DPO's data as its trainer builds it (``inverted_noise``, the released CFG-2 inverter, a ``steps``
    grid), with every inversion computed up front by the reference network: (dataset, step setup, build seconds)."""
    base = CachedPairDataset(records, keys, cache, random_flip=False)
    method = InversionDPOConfig(num_inversion_steps=steps, trajectory_steps=min(8, steps))
    spec = InversionSpec(**{f.name: getattr(method, f.name) for f in dataclasses.fields(InversionSpec)})
    grid, alphas = method_grid(spec, adapter)
    model_id = {"model": "bench", "revision": None, "variant": None}
    t0 = time.perf_counter()
    with models.reference() as ref:
        inv_cache = InversionCache(cache.dir, inversion_fingerprint(spec, model_id, adapter, ref))
        build_inversion_cache(
            inv_cache, base, adapter, ref, spec, resolution=res, flips=(False,), device=device, progress=False
        )
    sync(device)
    build_s = time.perf_counter() - t0
    inv_cache.reload()
    dataset = InversionPairDataset(
        base,
        inv_cache,
        mode=spec.mode,
        num_steps=steps,
        trajectory_steps=spec.trajectory_steps,
        random_flip=False,
    )
    return dataset, (spec, method, grid, alphas), build_s


def dpo_step(raw, adapter, cache, res, device, dtype, models, opt, inversion=None) -> None:
    """One training step as the loop runs it: batch to the device, loss under autocast, backward, AdamW; synced.

    ``inversion`` = (spec, method config, grid, levels): an Inversion-DPO step on cached inversion slices."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        if inversion is None:
            batch = prepare_pair_batch(raw, adapter, cache, 0.0, res, device)
            loss, _ = compute_loss(batch, models, DiffusionDPOConfig())
        else:
            spec, method, grid, alphas = inversion
            batch = prepare_inversion_batch(
                raw,
                device,
                adapter=adapter,
                latent_cache=cache,
                spec=spec,
                caption_dropout=0.0,
                resolution=res,
                grid=grid,
                alphas=alphas,
            )
            loss, _ = inversion_dpo.compute_loss(batch, models, method)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)


class FlopCount(TorchDispatchMode):
    """FLOPs of the aten ops run inside it, by torch.utils.flop_counter's formulas (matmuls, convolutions,
    attention kernels; elementwise ops count 0). FlopCounterMode's module tracker hooks keep checkpointed blocks'
    recomputed activations alive until backward ends (3x the step's memory in a CPU check; OOM for SDXL full
    fine-tuning and Wan at 81 frames on an 80 GB card), so the benches count with this hook-free mode instead.

    ``checkpointed`` is the part counted inside gradient-checkpointed blocks' forwards (see ``count_flops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.checkpointed = 0
        self.depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
            self.total += flops
            if self.depth:
                self.checkpointed += flops
        return out


def count_flops(fn, model: torch.nn.Module | None = None) -> int:
    """FLOPs of ``fn()`` that a step needs: with ``model``'s gradient checkpointing on, the forward recomputed in
    backward is not counted. Every checkpointed block's forward is counted on the way in (diffusers runs it
    through the module's ``_gradient_checkpointing_func``), early stopping of the recomputation is off (so the
    recompute is exactly that forward again), and that forward is subtracted once where a gradient flows back
    through the block (a block before the first trained weight is never recomputed)."""
    counter = FlopCount()
    patched = []
    for module in model.modules() if model is not None else ():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is None or not getattr(module, "gradient_checkpointing", False):
            continue

        def tracked(*args, _func=func, **kwargs):
            before = counter.checkpointed
            counter.depth += 1
            try:
                out = _func(*args, **kwargs)
            finally:
                counter.depth -= 1
            outs = out if isinstance(out, tuple) else (out,)
            if not any(isinstance(o, torch.Tensor) and o.requires_grad for o in outs):
                counter.checkpointed = before  # nothing flows back through it: backward recomputes nothing
            return out

        module._gradient_checkpointing_func = tracked
        patched.append((module, func))
    try:
        with torch.utils.checkpoint.set_checkpoint_early_stop(False), counter:
            fn()
    finally:
        for module, func in patched:
            module._gradient_checkpointing_func = func
    return counter.total - counter.checkpointed


def count_step_flops(raw, adapter, cache, res, device, dtype, models, opt) -> int:
    """FLOPs of one step's denoiser work on ``raw`` (cached latents and embeddings: no encoder FLOPs): policy
    forward+backward and reference forward, as aten ops with their shapes, without checkpointing's recompute."""
    torch.manual_seed(0)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        batch = prepare_pair_batch(raw, adapter, cache, 0.0, res, device)

        def step():
            loss, _ = compute_loss(batch, models, DiffusionDPOConfig())
            loss.backward()

        flops = count_flops(step, models.denoiser)
    opt.zero_grad(set_to_none=True)
    return flops


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


def profile_steps(
    loader, adapter, cache, res, device, dtype, models, opt, inversion=None, n: int = 2
) -> None:
    """torch.profiler over ``n`` steps: the ops that take the time, and on CUDA the GPU-busy fraction (see
    ``busy_fraction``; below 1 = the GPU waits for the host)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for i, raw in enumerate(loader):
            if i >= n:
                break
            dpo_step(raw, adapter, cache, res, device, dtype, models, opt, inversion)
    wall_us = (time.perf_counter() - t0) * 1e6
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60), flush=True)
    # host-side work per step: every op is a dispatch (and on a GPU at least one kernel launch); the casts are
    # what train.trainable_dtype=bf16 removes
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    row = {
        "profile_steps": n,
        "profiled_s_per_step": round(wall_us / n / 1e6, 4),
        "aten_ops_per_step": sum(e.count for e in ops) / n,
        "cast_ops_per_step": sum(e.count for e in ops if e.key in ("aten::_to_copy", "aten::copy_")) / n,
    }
    if device.type == "cuda":
        row["gpu_busy_fraction"] = round(busy_fraction(prof.events(), wall_us), 3)
    print(json.dumps(row), flush=True)


def busy_fraction(events, wall_us: float) -> float:
    """Time in which the GPU ran anything (the union of its kernel, memcpy and memset intervals) / ``wall_us``.

    Only device-side events count: an op's "self CUDA" time is its kernels' time again, so summing the table's
    column (as this bench did before 2026-11-27) counts a kernel under its op and on its own row."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy / wall_us


def sig(x: float, digits: int = 6) -> float:
    """``x`` to ``digits`` significant digits (tiny CPU models' TFLOP figures are 1e-5)."""
    return float(f"{x:.{digits}g}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument(
        "--trainable-dtype",
        "--lora-dtype",
        dest="trainable_dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="the trained weights' dtype (the loop's train.trainable_dtype; bf16 keeps fp32 masters)",
    )
    parser.add_argument(
        "--full", action="store_true", help="full fine-tuning (fp32 weights, frozen reference copy)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--checkpoint-policy",
        nargs="+",
        choices=["recompute_all", "save_attention", "save_matmuls"],
        default=["recompute_all"],
        help="with --gradient-checkpointing: one or more policies, timed one after the other (train.checkpoint_policy)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print a torch.profiler table of 2 cached steps"
    )
    parser.add_argument(
        "--compile",
        nargs="+",
        choices=["none", "regional", "full"],
        default=["none"],
        help="one or more, timed one after the other in this process (none first: compiling is in place)",
    )
    parser.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        default="default",
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--attention-backend", choices=["sdpa", "xformers"], default="sdpa")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["uncached", "cached"],
        choices=["uncached", "cached", "inversion"],
        help="uncached / cached Diffusion-DPO steps; inversion: Inversion-DPO steps on a warm inversion cache",
    )
    parser.add_argument(
        "--inversion-steps", type=int, default=10, help="inversion grid (paper 80, toy recipe 10)"
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if "none" in args.compile[1:] or len(set(args.compile) - {"none"}) > 1:
        raise SystemExit("--compile: at most one of regional/full, after none (compilation is in place)")
    if args.checkpoint_policy != ["recompute_all"] and not args.gradient_checkpointing:
        raise SystemExit("--checkpoint-policy needs --gradient-checkpointing")
    run(args)


if __name__ == "__main__":
    main()
