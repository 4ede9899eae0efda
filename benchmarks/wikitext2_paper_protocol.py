"""The papers' WikiText-2 protocol at CPU size: AdamW against KOALA++ (noise E1a and E1c), lr grids, two
embedding protocols (trainable; frozen pretrained), KOALA++ (NS) at the best KOALA++ setting, the papers' own
AdamW baseline, and the frozen protocol's headline pair over three seeds and 12 epochs.

    python benchmarks/wikitext2_paper_protocol.py                 # about 3 hours on 2 CPU cores (measured)
    python benchmarks/wikitext2_paper_protocol.py --epochs 1 --long_epochs 2 --max_train_blocks 64 --output /tmp/quick

Every run is ``recipes/wikitext2_gpt.py --preset paper_cpu`` (GPT-1 blocks, 2 x 128, 4 heads, context 64,
consecutive 65-token chunks, batch 32, constant lr, no clipping) on ``recipes/data/wikitext-2`` (WikiText-2's validation and test text, kept in the repository): trained on
valid.txt, validated on the first 600 chunks of the first half of test.txt and tested on the first 600 chunks
of its second half (``--max_eval_blocks 600``; each half has about 1,900), same epochs, seed and data order.
GPT-1's embeddings cannot be fetched here, so the frozen protocol stands in for them with the embeddings of a
model pretrained by AdamW on the training text only (``pretrain/``: its weights are kept, and loaded with
``--embeddings_from``).

The grid, in order (each run is skipped when its results are there already, so an interrupted grid resumes):

1. ``pretrain/``: AdamW, lr 1e-3, trainable embeddings.
2. Per protocol: AdamW and KOALA++ (E1a ``second_moment``, E1c ``none``) at three learning rates each; the
   frozen protocol also runs the papers' AdamW script setting (lr 1e-5, wd 0.1). Where KOALA++'s best lr of
   a noise mode is the top of its grid, the grid goes on upward (``UPWARD``) until the best is interior or a
   run diverges. Then KOALA++ (NS) at the best KOALA++ setting.
3. ``frozen_pretrained/long/``: the frozen protocol's best AdamW and best KOALA++ at ``--long_epochs`` (12)
   epochs and three seeds each: mean +- sd of test perplexity, per-epoch curves.

Writes every run's results.json and curves.png, ``grid.md`` (all runs), ``compare.md`` (the best of each),
``compare.png`` (their curves), ``long.md``, ``long.json`` and ``long.png`` (the seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from koala_hf.recipe_support import compare
from koala_hf.recipe_support.plots import plot_curves

ROOT = Path(__file__).resolve().parents[1]

GRID = {  # (optimizer, noise) -> learning rates; noise None: not a KOALA run
    ("adamw", None): (3e-4, 1e-3, 3e-3),
    ("koala++", "second_moment"): (0.3, 1.0, 3.0),
    ("koala++", "none"): (5e-4, 1e-3, 2e-3),
}
# The official AdamW script's learning rate (spec: lr 1e-5, wd 0.1; the preset's AdamW weight decay is 0.1).
PAPER_ADAMW_LR = 1e-5
# Where the best lr of a KOALA++ noise mode is the top of its grid, these are tried next, in order.
UPWARD = {"second_moment": (10.0, 30.0, 100.0, 300.0), "none": (5e-3, 1e-2, 2e-2, 5e-2)}
SEEDS = (42, 43, 44)
PROTOCOLS = {"trainable": (), "frozen_pretrained": ("--embeddings_from", "{pretrain}", "--freeze_embeddings")}
# What a pretrained checkpoint needs for --embeddings_from; everything else the recipe writes is dropped.
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json")


def label(optimizer: str, noise: str | None, lr: float) -> str:
    return f"{optimizer}{'_' + noise if noise else ''}_lr{lr:g}"


def relative(path: Path) -> str:
    """Paths in the recorded commands relative to the repository, as a user would type them."""
    return os.path.relpath(path, ROOT)


def recipe(output: Path, common: list[str], *options: str, keep: tuple[str, ...] = ()) -> dict:
    """One recipe run, then only its measurements (and the files named in ``keep``) are kept. A run whose
    results.json (and ``keep`` files) are there already, from an interrupted grid, is not run again."""
    command = [sys.executable, "recipes/wikitext2_gpt.py", *common, *options, "--output_dir", relative(output)]
    if all((output / name).exists() for name in ("results.json", *keep)):
        print("done:", " ".join(command[1:]), flush=True)
        return json.loads((output / "results.json").read_text())
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    for path in output.iterdir():
        if path.name not in ("results.json", "curves.png", *keep):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return json.loads((output / "results.json").read_text())


def diverged(result: dict) -> bool:
    """No finite test perplexity, or a best validation perplexity no better than the untrained model's."""
    untrained = result["epochs"][0].get("validation_perplexity", math.inf)
    best = result["best_validation_perplexity"]
    return not math.isfinite(result["test_perplexity"]) or best is None or not best < untrained


def noise_of(result: dict) -> str | None:
    return result["hyperparameters"].get("noise") if result["optimizer"].startswith("koala") else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--long_epochs", type=int, default=12, help="epochs of the seeded headline runs")
    parser.add_argument("--max_train_blocks", type=int, default=None)
    parser.add_argument("--max_eval_blocks", type=int, default=600, help="validation and test chunks (of ~1,900)")
    parser.add_argument("--output", default="benchmarks/results/wikitext2_paper_protocol_cpu")
    args = parser.parse_args(argv)
    out = (ROOT / args.output).resolve() if not Path(args.output).is_absolute() else Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    base = ["--preset", "paper_cpu", "--data_dir", "recipes/data/wikitext-2", "--train_split", "validation",
            "--halve_test_split", "--max_eval_blocks", str(args.max_eval_blocks),
            "--disable_tqdm", "true", "--report_to", "none", "--save_total_limit", "1"]
    if args.max_train_blocks:
        base += ["--max_train_blocks", str(args.max_train_blocks)]
    common = base + ["--num_train_epochs", str(args.epochs)]

    pretrain = out / "pretrain"
    recipe(pretrain, common, "--optimizer", "adamw", "--learning_rate", "1e-3", keep=CHECKPOINT_FILES)
    runs: dict[str, list[dict]] = {}
    for protocol, options in PROTOCOLS.items():
        options = tuple(o.format(pretrain=relative(pretrain)) for o in options)
        done = runs.setdefault(protocol, [])

        def run(optimizer: str, noise: str | None, lr: float, *, name: str | None = None) -> dict:
            name = name or label(optimizer, noise, lr)
            extra = ("--optimizer_kwargs", json.dumps({"noise": noise})) if noise else ()
            result = recipe(out / protocol / name, common, *options, "--optimizer", optimizer,
                            "--learning_rate", f"{lr:g}", *extra)
            done.append({**result, "label": f"{protocol}/{name}"})
            return result

        for (optimizer, noise), rates in GRID.items():
            tried = [run(optimizer, noise, lr) for lr in rates]
            if optimizer == "adamw" and protocol == "frozen_pretrained":
                run("adamw", None, PAPER_ADAMW_LR)
            if noise is None:
                continue
            for lr in UPWARD[noise]:  # until the best lr is interior, or the top run diverges
                best = min(tried, key=lambda r: r["best_validation_perplexity"] or math.inf)
                if best is not tried[-1] or diverged(tried[-1]):
                    break
                tried.append(run(optimizer, noise, lr))
        koala = [r for r in done if r["optimizer"] == "koala++"]
        best = min(koala, key=lambda r: r["best_validation_perplexity"] or math.inf)
        run("koala++ns", noise_of(best), best["learning_rate"])

    every = [r for protocol in runs.values() for r in protocol]
    (out / "grid.md").write_text(compare.table(every) + "\n")
    best_runs = []
    for protocol, done in runs.items():
        for optimizer, noise in (("adamw", None), ("koala++", "second_moment"), ("koala++", "none"), ("koala++ns", None)):
            chosen = [r for r in done if r["optimizer"] == optimizer and (noise is None or noise_of(r) == noise)]
            best_runs.append(min(chosen, key=lambda r: r["best_validation_perplexity"] or math.inf))
    (out / "compare.md").write_text(compare.table(best_runs) + f"\nfigure: {args.output}/compare.png\n")
    plot_curves(best_runs, "validation_perplexity", out / "compare.png", "validation perplexity")
    print((out / "compare.md").read_text())

    long_runs(out, base, runs["frozen_pretrained"], relative(pretrain), args)


def long_runs(out: Path, base: list[str], frozen: list[dict], pretrain: str, args) -> None:
    """The frozen protocol's best AdamW and best KOALA++ (by validation), ``--long_epochs`` epochs, 3 seeds."""
    pair = []
    for optimizer in ("adamw", "koala++"):
        chosen = [r for r in frozen if r["optimizer"] == optimizer and r["learning_rate"] != PAPER_ADAMW_LR]
        pair.append(min(chosen, key=lambda r: r["best_validation_perplexity"] or math.inf))
    common = base + ["--num_train_epochs", str(args.long_epochs), "--embeddings_from", pretrain, "--freeze_embeddings"]
    summary = []
    for setting in pair:
        noise = noise_of(setting)
        name = label(setting["optimizer"], noise, setting["learning_rate"])
        extra = ("--optimizer_kwargs", json.dumps({"noise": noise})) if noise else ()
        seeds = []
        for seed in SEEDS:
            result = recipe(out / "frozen_pretrained" / "long" / f"{name}_seed{seed}", common,
                            "--optimizer", setting["optimizer"], "--learning_rate", f"{setting['learning_rate']:g}",
                            *extra, "--seed", str(seed))
            seeds.append({**result, "label": f"{name} seed {seed}"})
        summary.append({"setting": name, "runs": seeds})
    report = {"epochs": args.long_epochs, "seeds": list(SEEDS), "settings": [summarise(s) for s in summary]}
    (out / "long.json").write_text(json.dumps(report, indent=2))
    (out / "long.md").write_text(long_table(report) + f"\nfigure: {args.output}/long.png\n")
    plot_seeds(report, out / "long.png")
    print((out / "long.md").read_text())


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(setting: dict) -> dict:
    """Test perplexity and the per-epoch validation perplexity of one setting's seeds, mean and sample sd."""
    runs = setting["runs"]
    epochs = sorted({e["epoch"] for r in runs for e in r["epochs"] if "validation_perplexity" in e})
    curve = []
    for epoch in epochs:
        values = [e["validation_perplexity"] for r in runs for e in r["epochs"] if e["epoch"] == epoch]
        mean, sd = mean_sd(values)
        curve.append({"epoch": epoch, "mean": mean, "sd": sd, "values": values})
    test_mean, test_sd = mean_sd([r["test_perplexity"] for r in runs])
    first = runs[0]
    return {
        "setting": setting["setting"], "optimizer": first["optimizer"], "learning_rate": first["learning_rate"],
        "weight_decay": first["weight_decay"], "noise": noise_of(first),
        "seeds": [r["seed"] for r in runs], "test_perplexity": [r["test_perplexity"] for r in runs],
        "test_perplexity_mean": test_mean, "test_perplexity_sd": test_sd,
        "best_epoch": [r["best_epoch"] for r in runs], "validation_curve": curve,
        "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in runs),
        "commands": [r["command"] for r in runs], "device": first["device"], "dates": [r["date"] for r in runs],
    }


def long_table(report: dict) -> str:
    settings = report["settings"]
    lines = [f"Frozen pretrained embeddings, {report['epochs']} epochs, seeds {', '.join(map(str, report['seeds']))} "
             "(mean +- sample sd over the seeds):", "",
             "| setting | test PPL per seed | test PPL mean +- sd | best epoch per seed | s/epoch |", "|---|---|---|---|---|"]
    for s in settings:
        per_seed = ", ".join(f"{v:.1f}" for v in s["test_perplexity"])
        lines.append(f"| {s['setting']} | {per_seed} | {s['test_perplexity_mean']:.1f} +- {s['test_perplexity_sd']:.1f} | "
                     f"{', '.join(map(str, s['best_epoch']))} | {s['seconds_per_epoch']:.1f} |")
    heading = " | ".join(f"{s['setting']} val PPL" for s in settings)
    lines += ["", f"| epoch | {heading} | gap |", "|---|" + "---|" * (len(settings) + 1)]
    for rows in zip(*(s["validation_curve"] for s in settings)):
        cells = [f"{r['mean']:.1f} +- {r['sd']:.1f}" for r in rows]
        gap = rows[-1]["mean"] / rows[0]["mean"] - 1.0 if len(rows) == 2 else math.nan
        lines.append(f"| {rows[0]['epoch']} | {' | '.join(cells)} | {100 * gap:+.1f}% |")
    lines += ["", "gap: the second setting's mean validation perplexity against the first's.", ""]
    lines += [f"- {command}" for s in settings for command in s["commands"]]
    lines.append(f"- device: {settings[0]['device']}; dates {settings[0]['dates'][0]} to {settings[-1]['dates'][-1]}")
    return "\n".join(lines)


def plot_seeds(report: dict, path: Path) -> None:
    """Mean validation perplexity per epoch with a +-1 sd band, every seed as a thin line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5))
    for s in report["settings"]:
        curve = [c for c in s["validation_curve"] if c["epoch"] > 0]
        epochs = [c["epoch"] for c in curve]
        mean = [c["mean"] for c in curve]
        line, = axis.plot(epochs, mean, marker="o", label=f"{s['setting']} (test {s['test_perplexity_mean']:.1f} "
                                                         f"+- {s['test_perplexity_sd']:.1f})")
        axis.fill_between(epochs, [c["mean"] - c["sd"] for c in curve], [c["mean"] + c["sd"] for c in curve],
                          color=line.get_color(), alpha=0.2)
        for seed_values in zip(*(c["values"] for c in curve)):
            axis.plot(epochs, seed_values, color=line.get_color(), alpha=0.35, linewidth=0.8)
    axis.set(xlabel="epoch", ylabel="validation perplexity", yscale="log",
             title=f"frozen pretrained embeddings, {len(report['seeds'])} seeds")
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
