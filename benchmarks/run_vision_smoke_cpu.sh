#!/usr/bin/env bash
# The vision recipe's smoke preset on this machine's CPU with KOALA++ and SGD, on small synthetic
# archives written in the real CIFAR-10 format (no CIFAR data can be fetched here): it measures the
# pipeline (data-loading images/s against training images/s), not accuracy on CIFAR.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/vision_smoke_cpu}
data=$(mktemp -d)
python -c "from pathlib import Path; from tests.recipes.archives import write_cifar10; write_cifar10(Path('$data'))"
for optimizer in koala++ sgd; do
  python recipes/timm_vision.py --preset smoke --data_dir "$data" --optimizer $optimizer --output_dir "$out/$optimizer" \
    --disable_tqdm true --save_strategy no --report_to none
done
python recipes/compare.py "$out/koala++" "$out/sgd" --output "$out/compare.png" > "$out/compare.md"
find "$out" -mindepth 2 -maxdepth 2 ! -name results.json ! -name curves.png -exec rm -rf {} +  # keep the measurements, not the weights
rm -rf "$data"
