#!/usr/bin/env bash
# GPU benchmarks, run through the device tool from the repo root (writes JSON lines to $OUT):
#   bash bench/gpu_run.sh
# Wheels for packages the GPU image lacks (diffusers, open_clip) travel in .whl (see BENCHMARKS.md).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
# 1. Diffusion-DPO step on the real SDXL architecture (2.6B UNet, random weights), 1024 px, bf16, LoRA r8:
#    latent/text cache on vs off, side by side.
timeout 300 python3 bench/bench_train_step.py --preset sdxl --device cuda --dtype bf16 --batch 1 --steps 8 --warmup 3 2>&1 \
  | grep -v -i warn | tee "$OUT/train_step_sdxl.jsonl"
timeout 120 python3 bench/bench_train_step.py --preset sdxl --device cuda --dtype bf16 --batch 4 --steps 5 --warmup 2 --gradient-checkpointing 2>&1 \
  | grep -v -i warn | tee "$OUT/train_step_sdxl_b4_gc.jsonl"
# 2. Reward scoring: batched tensor path vs per-image PIL loop on a ViT-H-14 (HPSv2/PickScore backbone).
timeout 150 python3 bench/bench_rewards.py --arch ViT-H-14 --device cuda --n 256 --batch-size 64 --dtype bfloat16 2>&1 \
  | grep -v -i warn | tee "$OUT/rewards_vith14.jsonl"
