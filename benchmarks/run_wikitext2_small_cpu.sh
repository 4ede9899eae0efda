#!/usr/bin/env bash
# The issue-4 comparison without a GPU: the `small` preset on this machine's CPU, trained on the
# real valid.txt, validated on the first half of test.txt and tested on the second half, 10 epochs,
# KOALA++ (spec settings), KOALA++ at lr=1.0 and AdamW, same data order, schedule and seed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/wikitext2_small_cpu}
common=(--preset small --data_dir ../shared/data/wikitext-2 --train_split validation --halve_test_split
        --num_train_epochs 10 --disable_tqdm true --save_total_limit 1 --report_to none)
python recipes/wikitext2_gpt.py "${common[@]}" --optimizer koala++ --output_dir "$out/koala++"
python recipes/wikitext2_gpt.py "${common[@]}" --optimizer adamw --output_dir "$out/adamw"
python recipes/wikitext2_gpt.py "${common[@]}" --optimizer koala++ --learning_rate 1.0 --output_dir "$out/koala++_lr1"
python recipes/compare.py "$out/koala++" "$out/koala++_lr1" "$out/adamw" --output "$out/compare.png" > "$out/compare.md"
# keep the measurements (results.json, curves.png), not the weights, tokenizer and checkpoints
find "$out" -mindepth 2 -maxdepth 2 ! -name results.json ! -name curves.png -exec rm -rf {} +
