#!/usr/bin/env bash
# GPU benchmarks, run through the device tool from the repo root (writes JSON lines to $OUT):
#   bash bench/gpu_run.sh
# Wheels for packages the GPU image lacks (diffusers, open_clip) travel in .whl (see BENCHMARKS.md).
# Every bench_train_step row carries pairs_per_s, the floor (FLOPs counted by FlopCounterMode / the matmul rate
# measured in the same run) and floor_ratio; --profile adds the op table and gpu_busy_fraction.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
SDXL="bench/bench_train_step.py --preset sdxl --device cuda --dtype bf16"
# 1. Diffusion-DPO step on the real SDXL architecture (2.6B UNet, random weights), 1024 px, bf16, LoRA r8:
#    latent/text cache on vs off, side by side, with the profile (GPU-busy fraction) of the cached step.
timeout 300 python3 $SDXL --batch 1 --steps 8 --warmup 3 --profile 2>&1 \
  | grep -v -i warn | tee "$OUT/train_step_sdxl.jsonl"
# 2. The <= 24 GiB point (4 pairs, checkpointing), eager, then each fast path alone (cached mode only):
timeout 120 python3 $SDXL --batch 4 --steps 5 --warmup 2 --gradient-checkpointing --modes cached --profile 2>&1 \
  | grep -v -i warn | tee "$OUT/train_step_sdxl_b4_gc.jsonl"
timeout 90 python3 $SDXL --batch 4 --steps 5 --warmup 2 --gradient-checkpointing --modes cached --channels-last 2>&1 \
  | grep -v -i warn | tee "$OUT/train_step_sdxl_b4_gc_channels_last.jsonl"
#    regional compile: the warmup steps absorb the compile (reported in the log's timing of warmup, not the rate)
timeout 240 python3 $SDXL --batch 4 --steps 5 --warmup 3 --gradient-checkpointing --modes cached --compile regional --profile 2>&1 \
  | grep -v -i warn | tee "$OUT/train_step_sdxl_b4_gc_regional.jsonl"
# 3. Reward scoring: batched tensor path vs per-image PIL loop on a ViT-H-14 (HPSv2/PickScore backbone), and end
#    to end from PNG files with decoding in 0 and 8 worker processes (fraction of the tensor path).
timeout 200 python3 bench/bench_rewards.py --arch ViT-H-14 --device cuda --n 256 --batch-size 64 --dtype bfloat16 --disk-workers 0 8 2>&1 \
  | grep -v -i warn | tee "$OUT/rewards_vith14.jsonl"
