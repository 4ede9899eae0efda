"""Draw several runs on one figure and print a results table.

    python recipes/compare.py runs/koala runs/adamw --output runs/compare.png

Each argument is a run folder (or its results.json) written by a recipe. The
table is Markdown, ready for the README.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_support import plot_curves  # noqa: E402

# Per task: the per-epoch metric to draw, and the table's columns (key, heading, format).
TASKS = {
    "wikitext2_gpt": (
        "validation_perplexity",
        [("best_validation_perplexity", "best val PPL", "{:.2f}"), ("test_perplexity", "test PPL", "{:.2f}"),
         ("seconds_per_epoch", "s/epoch", "{:.1f}"), ("tokens_per_second", "tokens/s", "{:,.0f}")],
    ),
    "timm_vision": (
        "validation_top1_error",
        [("best_validation_top1_error", "best val top-1 err %", "{:.2f}"), ("test_top1_error", "top-1 err %", "{:.2f}"),
         ("test_top5_error", "top-5 err %", "{:.2f}"), ("seconds_per_epoch", "s/epoch", "{:.1f}"),
         ("images_per_second", "images/s", "{:,.0f}")],
    ),
}


def load(path: str) -> dict:
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.exists():
        raise SystemExit(f"{path}: no results.json (is it a recipe's --output_dir?)")
    results = json.loads(file.read_text())
    results.setdefault("label", f"{results['optimizer']} ({file.parent.name})")
    return results


def table(runs: list[dict]) -> str:
    task = runs[0]["task"]
    if any(run["task"] != task for run in runs):
        raise SystemExit("compare runs of one task at a time")
    columns = TASKS[task][1]
    head = ["run", "optimizer", "preset", "epochs"] + [heading for _, heading, _ in columns]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        trained = run.get("num_epochs", len([e for e in run["epochs"] if e["epoch"] > 0]))  # epoch 0: untrained
        cells = [run["label"], run["optimizer"], run["preset"], str(trained)]
        cells += [fmt.format(run[key]) if run.get(key) is not None else "-" for key, _, fmt in columns]
        rows.append("| " + " | ".join(cells) + " |")
    rows.append("")
    rows += [f"- {run['label']}: {run.get('device', '?')}, {run.get('date', '?')}: `{run.get('command', '?')}`" for run in runs]
    return "\n".join(rows)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders or results.json files")
    parser.add_argument("--output", default="compare.png", help="figure to write")
    args = parser.parse_args(argv)
    runs = [load(run) for run in args.runs]
    text = table(runs)
    metric = TASKS[runs[0]["task"]][0]
    plot_curves(runs, metric, args.output, metric.replace("_", " "))
    print(text)
    print(f"\nfigure: {args.output}")
    return text


if __name__ == "__main__":
    main()
