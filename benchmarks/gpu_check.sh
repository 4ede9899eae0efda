#!/usr/bin/env bash
# The prepared GPU check: one CUDA GPU (an H100 or H200), under 5 minutes. Run from anywhere:
#
#     bash benchmarks/gpu_check.sh
#
# 1. The optimizer-step benchmark on CUDA, every path (per-tensor, foreach, fused = Triton, and the Triton
#    kernels asked for by name) against AdamW foreach and fused: median step time, that no KOALA step
#    synchronises with the host (torch.cuda.set_sync_debug_mode("error")), achieved bandwidth as a fraction of
#    the device's copy bandwidth, device kernels per step (profiler), ATen ops and Triton launches per step,
#    and each path's distance from its variant's per-tensor path after the same steps (compiled Triton, not
#    the interpreter the CPU tests use).
# 2. The training-step benchmark: KOALA++ with its fused (Triton) step against AdamW foreach and fused, on the
#    WikiText-2 recipe's GPT (batch 32) and the vision recipe's ResNet-50 (batch 128).
#
# Writes benchmarks/results/optimizer_step_cuda.{json,md} and train_step_cuda.{json,md}; then
# `python benchmarks/render_readme.py` puts them in the README.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
"$PYTHON" -c "import torch, triton; assert torch.cuda.is_available(), 'benchmarks/gpu_check.sh needs a CUDA GPU'; print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'triton', triton.__version__)"
"$PYTHON" benchmarks/optimizer_step.py --device cuda --steps 20 --warmup 5
"$PYTHON" benchmarks/train_step.py --device cuda --koala_fused --steps 10 --warmup 3
