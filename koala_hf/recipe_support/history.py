"""What a run did, epoch by epoch, from the Trainer's log history: timing, validation metrics, what was trained."""

from __future__ import annotations

import math
import time

import torch
from transformers import TrainerCallback

from koala_hf.recipe_support.machine import accelerator_available, launcher


class RunHistory(TrainerCallback):
    """Records into the Trainer's log history, so that checkpoints carry it and a resumed run reports it whole:
    the evaluation of the untrained model (epoch 0) and the seconds and items of every epoch trained.

    Items are the epoch's share of ``items_per_epoch`` actually trained (a ``--max_steps`` run may stop mid-epoch).
    """

    def __init__(self, items_per_epoch: int, initial_metrics: dict | None = None):
        self.items_per_epoch = items_per_epoch
        self.initial_metrics = initial_metrics
        self._start = self._start_epoch = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.initial_metrics is not None and state.global_step == 0:
            state.log_history.append({**self.initial_metrics, "epoch": 0.0, "step": 0})

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start, self._start_epoch = time.perf_counter(), state.epoch or 0.0

    def on_epoch_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._start
        items = (state.epoch - self._start_epoch) * self.items_per_epoch
        state.log_history.append({"epoch": state.epoch, "step": state.global_step,
                                  "epoch_seconds": seconds, "epoch_items": items})


def epoch_key(epoch: float) -> float | int:
    """An epoch as reported: whole epochs as integers, a partial one (``--max_steps``) to 4 decimals."""
    rounded = round(epoch, 4)
    return int(rounded) if rounded == int(rounded) else rounded


def epoch_table(log_history: list[dict], throughput_name: str) -> tuple[list[dict], dict]:
    """Per epoch: validation metrics (``validation_<name>``) and timing; plus the totals over the trained epochs.

    Built from the log history alone, so an interrupted and resumed run gives the same table.
    """
    epochs: dict = {}
    for entry in log_history:
        if "epoch" not in entry or not ("eval_loss" in entry or "epoch_seconds" in entry):
            continue  # training-loss logs carry fractional epochs too
        row = epochs.setdefault(epoch_key(entry["epoch"]), {"epoch": epoch_key(entry["epoch"])})
        if "eval_loss" in entry:
            row.update({f"validation_{k[5:]}": v for k, v in entry.items() if k.startswith("eval_")
                        and not k.endswith(("_runtime", "_per_second", "_preparation_time"))})
        if "epoch_seconds" in entry:
            row.update(seconds=entry["epoch_seconds"], items=entry["epoch_items"])
    rows = [epochs[k] for k in sorted(epochs)]
    timed = [r for r in rows if "seconds" in r]
    for row in timed:
        row[throughput_name] = row["items"] / row["seconds"]
    seconds, items = sum(r["seconds"] for r in timed), sum(r.pop("items") for r in timed)
    totals = {"training_seconds": seconds, throughput_name: items / seconds if seconds else None,
              "seconds_per_epoch": seconds / len(timed) if timed else None}
    return rows, totals


def run_record(trainer, training) -> dict:
    """What was trained and how, for ``results.json``: steps, epochs (a fraction when stopped by
    ``--max_steps``), the launcher, processes, mixed precision and CPU threads."""
    state = trainer.state
    return {
        "steps": state.global_step,
        "num_epochs": epoch_key(state.epoch or 0.0),
        "max_steps": training.max_steps if training.max_steps and training.max_steps > 0 else None,
        "evaluated_model": training.evaluated_model,
        "launcher": launcher(),
        "processes": training.world_size,
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "cpu_threads": None if accelerator_available() else torch.get_num_threads(),
    }


def train_losses(log_history: list[dict]) -> list[tuple[float, float]]:
    return [(entry["epoch"], entry["loss"]) for entry in log_history if "loss" in entry and "epoch" in entry]


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
