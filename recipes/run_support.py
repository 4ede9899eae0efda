"""What the recipes share: optimizers by name with the papers' settings, epoch timing, results files.

Every recipe builds its optimizer through :func:`optimizer_cls_and_kwargs`, so
KOALA and the baselines get the Trainer's parameter groups (no weight decay on
biases and norms), the same data order, schedule and seed.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback, TrainingArguments

from koala_hf.registry import OPTIMIZERS, optimizer_entry

BASELINES = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}
OPTIMIZER_CHOICES = tuple(OPTIMIZERS) + tuple(BASELINES)


def optimizer_cls_and_kwargs(name: str, settings: dict, overrides: dict | None = None):
    """``(class, kwargs)`` for the Trainer: ``settings`` are the task's defaults per optimizer name."""
    name = name.lower()
    if name not in OPTIMIZER_CHOICES:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZER_CHOICES)}")
    kwargs = dict(settings.get(name, {}))
    kwargs.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if name in BASELINES:
        return BASELINES[name], kwargs
    entry = optimizer_entry(name)
    return entry.cls, {**entry.defaults, **kwargs}


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for the recipes: unset values come from the preset and the optimizer's settings.

    Evaluates and checkpoints every epoch and keeps the best-validation model
    (the papers' protocol); everything else is the Trainer's.
    """

    learning_rate: float | None = field(default=None, metadata={"help": "Unset: the optimizer's setting for the task."})
    weight_decay: float | None = field(default=None, metadata={"help": "Unset: the optimizer's setting for the task."})
    per_device_train_batch_size: int | None = field(default=None, metadata={"help": "Unset: the preset's batch."})
    num_train_epochs: float | None = field(default=None, metadata={"help": "Unset: the preset's epochs."})
    eval_strategy: str = "epoch"
    save_strategy: str = "epoch"
    save_total_limit: int | None = 2
    load_best_model_at_end: bool = True
    metric_for_best_model: str | None = "eval_loss"
    logging_steps: float = 10
    output_dir: str | None = "runs/latest"

    def take_push_request(self) -> dict | None:
        """``--push_to_hub``: push the finished run's model folder and card (koala_hf.hub), not the Trainer's checkpoints."""
        if not self.push_to_hub:
            return None
        self.push_to_hub = False
        repo_id = self.hub_model_id or Path(self.output_dir).resolve().name
        return {"repo_id": repo_id, "private": self.hub_private_repo, "token": self.hub_token}

    def apply_preset(self, *, batch_size: int, epochs: float) -> None:
        if self.per_device_train_batch_size is None:
            self.per_device_train_batch_size = max(1, batch_size // (self.gradient_accumulation_steps * self.world_size))
        if self.num_train_epochs is None:
            self.num_train_epochs = epochs

    def resolve_optimizer(self, name: str, settings: dict, overrides: dict):
        """Fill the unset learning rate and weight decay from ``settings[name]``; return ``(class, kwargs)``."""
        chosen = {**settings.get(name.lower(), {}), **overrides}
        if self.learning_rate is None:
            self.learning_rate = chosen.get("lr", 1e-3)
        if self.weight_decay is None:
            self.weight_decay = chosen.get("weight_decay", 0.0)
        # The Trainer applies weight decay per parameter group (none for biases and norms).
        kwargs = {k: v for k, v in chosen.items() if k != "weight_decay"}
        kwargs["lr"] = self.learning_rate
        return optimizer_cls_and_kwargs(name, {}, kwargs)


ROOT = Path(__file__).resolve().parents[1]


def describe_device(device: str | None = None) -> str:
    """The hardware a run measured: the GPUs when it ran on CUDA, else the CPU and its threads."""
    if (device is None or device.startswith("cuda")) and torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class EpochTimer(TrainerCallback):
    """Seconds and items (tokens or images) per second of every training epoch."""

    def __init__(self, items_per_epoch: int):
        self.items_per_epoch = items_per_epoch
        self.epochs: list[dict] = []
        self._start = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._start
        self.epochs.append({"epoch": len(self.epochs) + 1, "seconds": seconds, "items_per_second": self.items_per_epoch / seconds})


def epoch_metrics(log_history: list[dict], prefix: str = "eval_") -> dict[int, dict]:
    """The evaluation entries of the Trainer's log history, keyed by (rounded) epoch."""
    metrics = {}
    for entry in log_history:
        if f"{prefix}loss" in entry and "epoch" in entry:
            metrics[round(entry["epoch"])] = {k[len(prefix):]: v for k, v in entry.items() if k.startswith(prefix)}
    return metrics


def train_losses(log_history: list[dict]) -> list[tuple[float, float]]:
    return [(entry["epoch"], entry["loss"]) for entry in log_history if "loss" in entry and "epoch" in entry]


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces a run: the script (relative to the repository) and its arguments."""
    relative = Path(script).resolve().relative_to(ROOT)
    return shlex.join(["python", str(relative)] + list(sys.argv[1:] if argv is None else argv))


def provenance(script: str, argv: list[str] | None, device: str | None = None) -> dict:
    """What stamps every results file: the exact command, the device and the date."""
    return {
        "command": command_line(script, argv),
        "device": describe_device(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_report(output_dir: str | Path, stem: str, report: dict, markdown: str) -> None:
    """A benchmark's ``<stem>.json`` and ``<stem>.md`` in ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(markdown)


def write_results(output_dir: str | Path, results: dict, stamp: dict) -> Path:
    """``results.json`` with the run's metrics plus its :func:`provenance`."""
    results = {**results, **stamp}
    path = Path(output_dir) / "results.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    return path


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


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
