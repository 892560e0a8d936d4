"""DenseDPO training-step benchmark on the real video transformers (Wan 2.1 1.3B, CogVideoX-2B), random weights.

One step is what the loop runs for ``method.name: dense_dpo`` with cached latents and text embeddings: the
family's adapter (``WanAdapter`` / ``CogVideoXAdapter``), `dense_dpo.compute_loss` on a pair of clips with
per-latent-frame labels, backward and an AdamW step on the LoRA weights. The clips are random latents of the
shape the VAE gives for the paper's clip size, and the text embeddings random ones of the T5 width (the cache
holds both, so neither the VAE nor the 5B-parameter T5 runs in a cached step)::

    python bench/bench_video_step.py --preset wan-tiny                       # CPU, seconds
    python bench/bench_video_step.py --preset wan-1.3b --device cuda --dtype bf16 --gradient-checkpointing
    python bench/bench_video_step.py --preset cogvideox-2b --device cuda --dtype bf16 --gradient-checkpointing

Each row carries the hardware floor measured in the same run, as bench_train_step.py does: the FLOPs of the
step without recomputation (policy forward+backward on both clips, reference forward on both), counted with
torch.utils.flop_counter's formulas, over the matmul rate measured here. With ``--gradient-checkpointing`` the
step also runs a recomputed forward, which the floor leaves out (``count_flops`` in bench_train_step.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train_step import count_flops, device_name, matmul_rate, sig, sync  # noqa: E402

from mmalign.config import LoraConfig, TrainConfig  # noqa: E402
from mmalign.pipelines import make_adapter  # noqa: E402
from mmalign.pipelines.fast import apply_fast_paths, enable_checkpointing  # noqa: E402
from mmalign.trainers.common import TrainModels  # noqa: E402
from mmalign.trainers.dense_dpo import DenseDPOConfig, compute_loss  # noqa: E402
from mmalign.trainers.loop import add_lora, build_optimizer  # noqa: E402

# latent = [C, T, H, W] for the clip size named; text = (tokens, width) of the cached T5 embeddings
PRESETS = {
    "wan-1.3b": dict(  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json; 81 frames 480x832
        family="wan",
        clip="81 frames 480x832",
        latent=(16, 21, 60, 104),
        text=(512, 4096),
        transformer=dict(
            patch_size=(1, 2, 2),
            num_attention_heads=12,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960,
            num_layers=30,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,
        ),
    ),
    "wan-tiny": dict(
        family="wan",
        clip="9 frames 64x64",
        latent=(16, 3, 8, 8),
        text=(16, 32),
        transformer=dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=32,
            ffn_dim=64,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=64,
        ),
    ),
    "cogvideox-2b": dict(  # THUDM/CogVideoX-2b transformer/config.json; 49 frames 480x720
        family="cogvideox",
        clip="49 frames 480x720",
        latent=(16, 13, 60, 90),
        text=(226, 4096),
        transformer=dict(
            num_attention_heads=30,
            attention_head_dim=64,
            in_channels=16,
            out_channels=16,
            time_embed_dim=512,
            text_embed_dim=4096,
            num_layers=30,
            sample_width=90,
            sample_height=60,
            sample_frames=49,
            patch_size=2,
            max_text_seq_length=226,
            use_rotary_positional_embeddings=False,
            use_learned_positional_embeddings=False,
        ),
    ),
    "cogvideox-tiny": dict(
        family="cogvideox",
        clip="9 frames 64x64",
        latent=(16, 3, 8, 8),
        text=(16, 32),
        transformer=dict(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=16,
            out_channels=16,
            time_embed_dim=32,
            text_embed_dim=32,
            num_layers=2,
            sample_width=8,
            sample_height=8,
            sample_frames=9,
            patch_size=2,
            max_text_seq_length=16,
            use_rotary_positional_embeddings=False,
            use_learned_positional_embeddings=False,
        ),
    ),
}


def build_pipeline(preset: dict, device: str, dtype: torch.dtype) -> SimpleNamespace:
    """The pieces of the family's pipeline a cached training step touches: transformer, scheduler, and the VAE's
    config (built on the meta device: the adapter reads its compression and latent statistics only)."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        AutoencoderKLWan,
        CogVideoXDDIMScheduler,
        CogVideoXTransformer3DModel,
        UniPCMultistepScheduler,
        WanTransformer3DModel,
    )

    torch.manual_seed(0)
    if preset["family"] == "wan":
        with torch.device("meta"):
            vae = AutoencoderKLWan()
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )  # Wan 2.1 at 480p
        with torch.device(device):
            transformer = WanTransformer3DModel(**preset["transformer"])
    else:
        with torch.device("meta"):
            vae = AutoencoderKLCogVideoX()
        scheduler = CogVideoXDDIMScheduler(  # THUDM/CogVideoX-2b scheduler/scheduler_config.json
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            set_alpha_to_one=True,
            snr_shift_scale=3.0,
            timestep_spacing="trailing",
        )
        with torch.device(device):
            transformer = CogVideoXTransformer3DModel(**preset["transformer"])
    transformer.to(dtype)
    keep = getattr(transformer, "_keep_in_fp32_modules", None) or []
    for name, module in transformer.named_modules():  # as from_pretrained(torch_dtype=...) leaves them
        if any(k in name.split(".") for k in keep):
            module.float()
    return SimpleNamespace(
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        tokenizer=None,
        text_encoder=None,
        config=SimpleNamespace(
            boundary_ratio=None
        ),  # one transformer (Wan 2.1; not a Wan 2.2 A14B expert pair)
    )


def make_batch(preset: dict, pairs: int, device: torch.device, generator: torch.Generator) -> dict:
    """Cached clips as the loop's batch: latents [B,C,T,H,W], per-latent-frame labels [B,T], clip labels [B]."""
    c, t, h, w = preset["latent"]
    tokens, width = preset["text"]

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    labels = torch.randint(-1, 2, (pairs, t), generator=generator).float()
    return {
        "latents_0": randn(pairs, c, t, h, w),
        "latents_1": randn(pairs, c, t, h, w),
        "labels": labels.to(device),
        "clip_label": torch.where(labels.sum(1) >= 0, 1.0, -1.0).to(device),
        "cond": {"encoder_hidden_states": randn(pairs, tokens, width)},
    }


def run(args) -> dict:
    preset = PRESETS[args.preset]
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    pipe = build_pipeline(preset, args.device, dtype)
    adapter = make_adapter(pipe, preset["family"])
    net = pipe.transformer
    net.requires_grad_(False)
    add_lora(net, LoraConfig(rank=args.rank))
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # the loop's LoRA masters
    net.train()
    if args.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    opt = build_optimizer(params, TrainConfig(), 1e-5)  # the loop's AdamW (fused kernel)
    models = TrainModels(adapter, net)
    method = DenseDPOConfig(loss=args.loss)
    gen = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(batch):
        with autocast:
            loss, _ = compute_loss(batch, models, method)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    rate = matmul_rate(device, dtype)
    batch = make_batch(preset, args.batch, device, gen)
    torch.manual_seed(0)
    flops = count_flops(lambda: step(batch), net)  # the step without checkpointing's recomputed forward
    if args.gradient_checkpointing:  # counted under recompute_all (count_flops subtracts whole forwards)
        enable_checkpointing(net, args.checkpoint_policy)
    apply_fast_paths(net, compile=args.compile, compile_mode=args.compile_mode)
    floor_s = flops / rate
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        batch = make_batch(preset, args.batch, device, gen)
        sync(device)
        t0 = time.perf_counter()
        step(batch)
        sync(device)
        if i == 0:
            first_s = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    c, t, h, w = preset["latent"]
    row = {
        "preset": args.preset,
        "method": f"dense_dpo ({args.loss})",
        "clip": preset["clip"],
        "latent": [c, t, h, w],
        "device": device_name(device),
        "dtype": args.dtype,
        "pairs_per_step": args.batch,
        "steps": len(times),
        "seconds_per_step": round(step_s, 4),
        "seconds_per_pair": round(step_s / args.batch, 4),
        "first_step_s": round(first_s, 3),
        "lora_rank": args.rank,
        "compile": args.compile,
        "gradient_checkpointing": args.gradient_checkpointing,
        "checkpoint_policy": args.checkpoint_policy if args.gradient_checkpointing else None,
        "step_tflop": sig(flops / 1e12),
        "matmul_tflops": sig(rate / 1e12),
        "floor_s_per_pair": sig(floor_s / args.batch),
        "floor_ratio": sig(floor_s / step_s, 4),
    }
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(row), flush=True)
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="wan-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=1, help="pairs per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--loss", choices=["dense", "vanilla"], default="dense")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--checkpoint-policy",
        choices=["recompute_all", "save_attention", "save_matmuls"],
        default="recompute_all",
        help="with --gradient-checkpointing: what checkpointed blocks keep (train.checkpoint_policy)",
    )
    parser.add_argument("--compile", choices=["none", "regional", "full"], default="none")
    parser.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        default="default",
    )
    return parser


if __name__ == "__main__":
    run(build_parser().parse_args())
