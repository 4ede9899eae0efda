"""Several runs of one task side by side: a Markdown table (the task's columns, koala_hf.recipe_support.results)
and their curves on one figure."""

from __future__ import annotations

from pathlib import Path

from koala_hf.recipe_support.plots import plot_curves
from koala_hf.recipe_support.results import load_results, schema


def load(path: str | Path) -> dict:
    """A run (its folder or its results.json), labelled by its optimizer and folder unless it has a label."""
    try:
        results = load_results(path)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from None
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    results.setdefault("label", f"{results['optimizer']} ({folder.name})")
    return results


def table(runs: list[dict]) -> str:
    """The Markdown comparison table, then each run's command, device and date."""
    task = runs[0]["task"]
    if any(run["task"] != task for run in runs):
        raise SystemExit("compare runs of one task at a time")
    columns = schema(task).columns
    head = ["run", "optimizer", "preset", "epochs"] + [column.heading for column in columns]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        cells = [run["label"], run["optimizer"], run["preset"], str(run["num_epochs"])]
        cells += [c.format.format(run[c.key]) if run.get(c.key) is not None else "-" for c in columns]
        rows.append("| " + " | ".join(cells) + " |")
    rows.append("")
    rows += [f"- {run['label']}: {run['device']}, {run['date']}: `{run['command']}`" for run in runs]
    return "\n".join(rows)


def figure(runs: list[dict], path: str | Path) -> Path:
    """Training loss and the task's per-epoch metric of every run."""
    task = schema(runs[0]["task"])
    return plot_curves(runs, task.epoch_metric, path, task.epoch_metric_label)
