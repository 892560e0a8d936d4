#!/usr/bin/env bash
# The GPU table in one run on one card, most important figure first, inside a time budget (default 540 s):
#   bash bench/gpu_run.sh                 # through the device tool, from the repo root (writes to $OUT)
#   BUDGET=900 bash bench/gpu_run.sh      # elsewhere, with more time
#   ONLY="wan-dense sdxl-full" BUDGET=230 bash bench/gpu_run.sh    # just the items named
# Wheels for the packages the GPU image lacks (diffusers, open_clip, ...) travel in .whl: `bash bench/gpu_wheels.sh` fills it.
# $OUT gets three files: gpu.txt (card, versions), log.txt (everything, profiles included) and results.jsonl (one
# JSON row per figure; each training row carries the floor: FLOPs counted from the model / matmul rate measured
# in the same run). An item that would not finish inside what is left of the budget is skipped, and says so.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-540}
T0=$(date +%s)
LOG="$OUT/log.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"

# item NAME SECONDS ARGS...: run `python3 ARGS` with at most SECONDS (less if less of the budget is left)
item() {
  local name=$1 want=$2; shift 2
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return 0; fi  # ONLY="a b": just those items
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  local limit=$(( want < left - 5 ? want : left - 5 ))
  if (( limit < 30 )); then echo "### $name: skipped, ${left}s of the budget left" | tee -a "$LOG"; return 1; fi
  echo "### $name (limit ${limit}s): python3 $*" | tee -a "$LOG"
  local t=$(date +%s)
  timeout "$limit" python3 "$@" 2>&1 | grep -v -i -E "warn|kept in float32|cuda_home" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "### $name: rc=$rc in $(( $(date +%s) - t ))s" | tee -a "$LOG"
  return "$rc"
}
# DEV=cpu SDXL=sdxl-small WAN=wan-tiny COG=cogvideox-tiny CLIP=small N=16: the same run at tiny sizes (a CPU check)
DEV=${DEV:-cuda}; N=${N:-1024}
# the CPU check runs the rewards item, not times it: fp32 (bf16 matmuls on a CPU without AVX-512 are ~5x slower),
# one timed repeat, 8 images through the per-image PIL loop
REWARD_OPTS="--dtype bfloat16"; [[ $DEV == cpu ]] && REWARD_OPTS="--dtype float32 --repeats 1 --pil-n 8"
SDXL="bench/bench_train_step.py --preset ${SDXL:-sdxl} --device $DEV --dtype bf16 --modes cached"
VIDEO="bench/bench_video_step.py --device $DEV --dtype bf16 --gradient-checkpointing"

# 0. smoke: the small models on this card; stop here (cheaply) if the environment cannot run the benches
item smoke 90 bench/bench_train_step.py --preset sdxl-small --device $DEV --dtype bf16 --modes cached \
  --batch 1 --steps 1 --warmup 0 && item smoke-video 60 bench/bench_video_step.py --preset wan-tiny --device $DEV \
  --dtype bf16 --steps 1 || { echo "### smoke failed: stopping" | tee -a "$LOG"; exit 1; }
# The rows never measured on a card come first (one device call gets through about five items), then the rows
# measured on 2026-11-27 again with what changed since, then the levers.
# 1. Wan 2.1 1.3B DenseDPO, 81 frames 480x832, LoRA r8
item wan-dense 120 $VIDEO --preset ${WAN:-wan-1.3b} --steps 2 --warmup 1
# 2. SDXL full fine-tuning DPO (fp32 weights + fused AdamW, bf16 frozen reference), 4 pairs, checkpointing; every
#    row also times the optimizer step alone, fused vs foreach
item sdxl-full 150 $SDXL --batch 4 --steps 4 --warmup 2 --gradient-checkpointing --full --profile
# 3. Inversion-DPO step on a warm inversion cache (10-step grid, CFG-2 inverter) beside the Diffusion-DPO step
item sdxl-inversion 170 $SDXL --batch 4 --steps 4 --warmup 2 --gradient-checkpointing --modes cached inversion --profile
# 4. reward scoring, ViT-H-14 bf16: raw backbone, batched tensors, and end to end from PNG files (0 / 8 / 14
#    workers; 1024 images so that starting the workers is not the figure), then the data path alone (no model)
item rewards-vith14 100 bench/bench_rewards.py --arch ${CLIP:-ViT-H-14} --device $DEV --n $N --batch-size 64 \
  $REWARD_OPTS --disk-workers 0 8 14
# 5. SDXL LoRA r8 Diffusion-DPO at 1024 px within 24 GiB (4 pairs, checkpointing): eager, then the repeated blocks
#    compiled, in one process (side by side; warm-up steps absorb the compile, first_step_s shows it), each profiled
item sdxl-lora 240 $SDXL --batch 4 --steps 5 --warmup 3 --gradient-checkpointing --compile none regional --profile
item rewards-data-path 60 bench/bench_rewards.py --data-path-only --device $DEV --n $N --batch-size 64 --disk-workers 8 14
# 6. Wan with its repeated blocks compiled (the lever that gave SDXL 1.41x), against the eager row above
item wan-dense-regional 150 $VIDEO --preset ${WAN:-wan-1.3b} --steps 2 --warmup 2 --compile regional
# 6b. CogVideoX-2B DenseDPO, 49 frames 480x720, LoRA r8 (measured 2026-11-27: 3.63 s/pair)
item cogvideox-dense 90 $VIDEO --preset ${COG:-cogvideox-2b} --steps 2 --warmup 1
# 7. levers, if time is left: bf16 LoRA weights with fp32 masters (train.trainable_dtype: the autocast-cast tax), channels-last with the compiled blocks
item sdxl-lora-bf16 90 $SDXL --batch 4 --steps 4 --warmup 1 --gradient-checkpointing --trainable-dtype bf16 --profile
item sdxl-lora-regional-cl 150 $SDXL --batch 4 --steps 5 --warmup 3 --gradient-checkpointing --compile regional \
  --channels-last
# 8. the 11 pairs/s levers: 8 pairs per step compiled (12.5 GiB of 24 used at 4), and selective checkpointing
#    (train.checkpoint_policy: keep attention / every matmul output instead of recomputing the whole block)
item sdxl-lora-8pairs 200 $SDXL --batch 8 --steps 4 --warmup 3 --gradient-checkpointing --compile regional
item sdxl-ckpt-policies 240 $SDXL --batch 4 --steps 4 --warmup 2 --gradient-checkpointing \
  --checkpoint-policy recompute_all save_attention save_matmuls
grep -h '^{' "$LOG" > "$OUT/results.jsonl"
echo "### done in $(( $(date +%s) - T0 ))s" | tee -a "$LOG"
