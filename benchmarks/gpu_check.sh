#!/usr/bin/env bash
# The prepared GPU check: one CUDA GPU (an H100 or H200), under 5 minutes. Run from anywhere:
#
#     bash benchmarks/gpu_check.sh
#     bash benchmarks/gpu_check.sh --device cpu --tiny --output /tmp/check   # every step at a tiny size, no GPU (CI)
#
# 1. The optimizer step on CUDA, fp32, on GPT-2 124M and 355M shapes, ResNet-50 and Swin-T: every path
#    (per-tensor, foreach, fused = the Triton kernels, the default) against AdamW foreach and fused: median
#    step time, whether a KOALA step synchronises with the host (set_sync_debug_mode; foreach does once), bandwidth
#    as a fraction of the device's copy bandwidth, device kernels per step, ATen ops and Triton launches per
#    step, and each path's distance from its variant's per-tensor path (parity, compiled Triton).
# 2. The same in bfloat16 on GPT-2 124M shapes (parity and times).
# 3. The end-to-end training step, KOALA++ on its default path against AdamW foreach and fused, on the
#    WikiText-2 recipe's GPT (batch 32) and the vision recipe's ResNet-50 (batch 128), bf16 autocast and fp32.
# 4. The README's main job (recipes/wikitext2_compare.py) with its tokens/s.
# 5. KoalaTrainer with nothing set: the backend every variant's steps ran on (the Triton kernels on CUDA).
#
# Writes benchmarks/results/{optimizer_step,train_step,default_path}_cuda*.{json,md} and main_job_cuda/; then
# `python benchmarks/render_readme.py` puts them in the docs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
device=cuda
tiny=0
output=benchmarks/results
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device=$2; shift 2 ;;
        --tiny) tiny=1; shift ;;
        --output) output=$2; shift 2 ;;
        *) echo "usage: bash benchmarks/gpu_check.sh [--device cuda|cpu] [--tiny] [--output DIR]" >&2; exit 2 ;;
    esac
done
if [ "$device" = cuda ]; then
    "$PYTHON" -c "import torch, triton; assert torch.cuda.is_available(), 'benchmarks/gpu_check.sh needs a CUDA GPU'; print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'triton', triton.__version__)"
fi
if [ "$tiny" = 1 ]; then
    shapes=(--workloads tiny); bf16_shapes=(--workloads tiny); steps=(--steps 1 --warmup 0)
    batches=(--lm_batch 1 --vision_batch 2 --tiny); main_job=(--max_train_blocks 16 --max_eval_blocks 8 --num_train_epochs 1)
else
    shapes=(--workloads gpt2-124m gpt2-355m resnet50 swin-t); bf16_shapes=(--workloads gpt2-124m); steps=(--steps 20 --warmup 5)
    batches=(); main_job=()
fi
"$PYTHON" benchmarks/optimizer_step.py --device "$device" "${steps[@]}" "${shapes[@]}" --output "$output"
"$PYTHON" benchmarks/optimizer_step.py --device "$device" "${steps[@]}" "${bf16_shapes[@]}" --dtype bfloat16 --output "$output"
"$PYTHON" benchmarks/train_step.py --device "$device" "${steps[@]}" "${batches[@]}" --bf16 --output "$output"
"$PYTHON" benchmarks/train_step.py --device "$device" "${steps[@]}" "${batches[@]}" --output "$output"
runs=$(mktemp -d)
"$PYTHON" recipes/wikitext2_compare.py --output_dir "$runs/main" "${main_job[@]}"
mkdir -p "$output/main_job_$device"
cp "$runs/main/compare.md" "$runs/main/compare.png" "$output/main_job_$device/"
for run in "$runs"/main/*/; do
    mkdir -p "$output/main_job_$device/$(basename "$run")"
    cp "$run/results.json" "$output/main_job_$device/$(basename "$run")/"
done
"$PYTHON" benchmarks/default_path.py --device "$device" --steps 4 --output "$output"
