"""The papers' WikiText-2 protocol at CPU size: AdamW against KOALA++ (noise E1a and E1c), lr grids, two
embedding protocols (trainable; frozen pretrained), then KOALA++ (NS) at the best KOALA++ setting.

    python benchmarks/wikitext2_paper_protocol.py                 # 67 minutes on 2 CPU cores (measured)
    python benchmarks/wikitext2_paper_protocol.py --epochs 1 --max_train_blocks 64 --output /tmp/quick   # a check

Every run is ``recipes/wikitext2_gpt.py --preset paper_cpu`` (GPT-1 blocks, 2 x 128, 4 heads, context 64,
consecutive 65-token chunks, batch 32, constant lr, no clipping) on ``../shared/data/wikitext-2``: trained on
valid.txt, validated on the first half of test.txt and tested on its second half, same epochs, seed and data
order. GPT-1's embeddings cannot be fetched here, so the frozen protocol stands in for them with the embeddings
of a model pretrained by AdamW on the training text only (``pretrain/``, saved once, loaded with
``--embeddings_from``). Writes every run's results.json and curves.png, ``grid.md`` (all runs), ``compare.md``
(the best of each) and ``compare.png`` (their curves).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import compare  # noqa: E402

GRID = {  # (optimizer, extra options) -> learning rates
    ("adamw", ()): (3e-4, 1e-3, 3e-3),
    ("koala++", ("--optimizer_kwargs", '{"noise": "second_moment"}')): (0.3, 1.0, 3.0),
    ("koala++", ("--optimizer_kwargs", '{"noise": "none"}')): (5e-4, 1e-3, 2e-3),
}
PROTOCOLS = {"trainable": (), "frozen_pretrained": ("--embeddings_from", "{pretrain}", "--freeze_embeddings")}


def label(optimizer: str, extra: tuple, lr: float) -> str:
    noise = json.loads(extra[1])["noise"] if extra else None
    return f"{optimizer}{'_' + noise if noise else ''}_lr{lr:g}"


def relative(path: Path) -> str:
    """Paths in the recorded commands relative to the repository, as a user would type them."""
    return os.path.relpath(path, ROOT)


def recipe(output: Path, common: list[str], *options: str) -> dict:
    """One recipe run; a run whose results.json is already there (an interrupted grid) is not run again."""
    command = [sys.executable, "recipes/wikitext2_gpt.py", *common, *options, "--output_dir", relative(output)]
    if (output / "results.json").exists():
        print("done:", " ".join(command[1:]), flush=True)
        return json.loads((output / "results.json").read_text())
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((output / "results.json").read_text())


def keep_measurements(folder: Path) -> None:
    for path in folder.iterdir():
        if path.name not in ("results.json", "curves.png"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max_train_blocks", type=int, default=None)
    parser.add_argument("--max_eval_blocks", type=int, default=600, help="validation and test chunks (of ~1,900)")
    parser.add_argument("--output", default="benchmarks/results/wikitext2_paper_protocol_cpu")
    args = parser.parse_args(argv)
    out = (ROOT / args.output).resolve() if not Path(args.output).is_absolute() else Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--preset", "paper_cpu", "--data_dir", "../shared/data/wikitext-2", "--train_split", "validation",
              "--halve_test_split", "--num_train_epochs", str(args.epochs), "--max_eval_blocks", str(args.max_eval_blocks),
              "--disable_tqdm", "true", "--report_to", "none", "--save_total_limit", "1"]
    if args.max_train_blocks:
        common += ["--max_train_blocks", str(args.max_train_blocks)]

    pretrain = out / "pretrain"
    recipe(pretrain, common, "--optimizer", "adamw", "--learning_rate", "1e-3")
    runs: dict[str, list[dict]] = {}
    for protocol, options in PROTOCOLS.items():
        options = tuple(o.format(pretrain=relative(pretrain)) for o in options)
        done = runs.setdefault(protocol, [])
        for (optimizer, extra), rates in GRID.items():
            for lr in rates:
                name = label(optimizer, extra, lr)
                result = recipe(out / protocol / name, common, *options, "--optimizer", optimizer,
                                "--learning_rate", f"{lr:g}", *extra)
                done.append({**result, "label": f"{protocol}/{name}"})
                keep_measurements(out / protocol / name)
        koala = [r for r in done if r["optimizer"] == "koala++"]
        best = min(koala, key=lambda r: r["best_validation_perplexity"])
        noise = best["hyperparameters"]["noise"]
        name = label("koala++ns", ("", json.dumps({"noise": noise})), best["learning_rate"])
        result = recipe(out / protocol / name, common, *options, "--optimizer", "koala++ns",
                        "--learning_rate", f"{best['learning_rate']:g}", "--optimizer_kwargs", json.dumps({"noise": noise}))
        done.append({**result, "label": f"{protocol}/{name}"})
        keep_measurements(out / protocol / name)
    keep_measurements(pretrain)

    every = [r for protocol in runs.values() for r in protocol]
    (out / "grid.md").write_text(compare.table(every) + "\n")
    best_runs = []
    for protocol, done in runs.items():
        for key in ("adamw", "koala++/second_moment", "koala++/none", "koala++ns"):
            optimizer, _, noise = key.partition("/")
            chosen = [r for r in done if r["optimizer"] == optimizer and (not noise or r["hyperparameters"]["noise"] == noise)]
            best_runs.append(min(chosen, key=lambda r: r["best_validation_perplexity"]))
    (out / "compare.md").write_text(compare.table(best_runs) + f"\nfigure: {args.output}/compare.png\n")
    compare.plot_curves(best_runs, "validation_perplexity", out / "compare.png", "validation perplexity")
    print((out / "compare.md").read_text())


if __name__ == "__main__":
    main()
