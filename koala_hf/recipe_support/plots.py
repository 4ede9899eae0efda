"""Curves of one or several runs: training loss and a per-epoch metric, side by side."""

from __future__ import annotations

from pathlib import Path


def plot_curves(results: list[dict], metric: str, path: str | Path, ylabel: str) -> Path:
    """Training loss and the per-epoch ``metric`` of one or several runs, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in results:
        label = run.get("label") or run["optimizer"]
        if run.get("train_loss_curve"):
            x, y = zip(*run["train_loss_curve"])
            left.plot(x, y, label=label)
        epochs = [e["epoch"] for e in run["epochs"] if metric in e]
        right.plot(epochs, [e[metric] for e in run["epochs"] if metric in e], marker="o", label=label)
    left.set(xlabel="epoch", ylabel="training loss", title="training loss")
    right.set(xlabel="epoch", ylabel=ylabel, title=ylabel)
    if any(e.get(metric, 0) > 0 for run in results for e in run["epochs"]) and "perplexity" in metric:
        right.set_yscale("log")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
