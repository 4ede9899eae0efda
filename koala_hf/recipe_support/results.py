"""``results.json``, the record every recipe run writes: its schema, written down once, and how it is written and read.

The recipes build their record with :func:`record` (which refuses a key the schema does not list, or one it
lists and the recipe left out), write it with :func:`write_results`, and everything that reads one
(``koala_hf.hub``'s model cards, ``recipes/compare.py``'s tables, the benchmarks) loads it with
:func:`load_results`, which names what a file lacks. ``TASKS`` says, per recipe, what each key holds and
which metric its tables and figures show.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

# Every run, whatever the task.
COMMON = {
    "task": "the recipe that wrote it (a key of TASKS)",
    "preset": "the recipe's --preset",
    "optimizer": "the optimizer's canonical name (koala++, koala++ns, koala-v, koala-m, adamw, adam, sgd)",
    "optimizer_kwargs": "the arguments the optimizer was built with, besides the Trainer's weight decay",
    "hyperparameters": "every constructor argument of the optimizer with the value used (its default where unset)",
    "learning_rate": "the learning rate",
    "weight_decay": "the Trainer's weight decay (none on biases and norms)",
    "batch_size": "the global batch: per device x accumulation x processes",
    "steps": "optimizer steps taken",
    "num_epochs": "epochs trained: an integer, or a fraction when --max_steps stopped the run",
    "max_steps": "--max_steps, or null",
    "evaluated_model": "which model the test metrics are of: 'best validation epoch' or 'final'",
    "launcher": "python, torchrun or accelerate launch",
    "processes": "the number of processes",
    "mixed_precision": "accelerate's mixed precision: no, fp16 or bf16",
    "cpu_threads": "torch's CPU threads (null on an accelerator)",
    "seed": "the Trainer's seed",
    "epochs": "one row per epoch: epoch (0: before training), validation_<metric> ..., seconds, <items>_per_second",
    "best_epoch": "the epoch of the best validation metric",
    "test_loss": "the test loss of the evaluated model",
    "training_seconds": "seconds spent in the epochs trained",
    "seconds_per_epoch": "their mean",
    "train_loss_curve": "[epoch, training loss] pairs, as logged",
    "command": "the command that reproduces the run, from the repository root",
    "device": "the hardware it ran on",
    "date": "when it finished, UTC",
}


@dataclass(frozen=True)
class Column:
    """One column of a comparison table: a key of the record, its heading and its format."""

    key: str
    heading: str
    format: str


@dataclass(frozen=True)
class TaskSchema:
    """What a task's ``results.json`` holds and how its runs are compared."""

    recipe: str  # the script, from the repository root
    keys: dict  # key -> what it holds, besides COMMON
    epoch_metric: str  # the per-epoch metric its figures draw (a key of each row of "epochs")
    epoch_metric_label: str
    columns: tuple[Column, ...]  # its comparison table, after run / optimizer / preset / epochs

    @property
    def all_keys(self) -> dict:
        return {**COMMON, **self.keys}


TASKS = {
    "wikitext2_gpt": TaskSchema(
        recipe="recipes/wikitext2_gpt.py",
        keys={
            "model": "architecture, n_layer, n_head, n_embd, block_size, vocab_size, parameters, trainable_parameters, "
                     "frozen_parameters, embeddings_from, frozen_embeddings",
            "data": "source, hub_dataset, train_split, halve_test_split, layout, train/validation/test_blocks",
            "lr_scheduler": "the Trainer's lr scheduler",
            "max_grad_norm": "gradient clipping (0: none)",
            "best_validation_perplexity": "the best epoch's validation perplexity",
            "test_perplexity": "exp(test_loss): mean next-token NLL over the test tokens",
            "tokens_per_second": "training tokens per second over the epochs trained",
        },
        epoch_metric="validation_perplexity",
        epoch_metric_label="validation perplexity",
        columns=(Column("best_validation_perplexity", "best val PPL", "{:.2f}"), Column("test_perplexity", "test PPL", "{:.2f}"),
                 Column("seconds_per_epoch", "s/epoch", "{:.1f}"), Column("tokens_per_second", "tokens/s", "{:,.0f}")),
    ),
    "timm_vision": TaskSchema(
        recipe="recipes/timm_vision.py",
        keys={
            "dataset": "cifar10, cifar100 or imagenet32", "num_classes": "classes",
            "hub_dataset": "the Hub dataset read, or null for --data_dir", "data_source": "where the images came from",
            "model": "the 32x32 timm architecture", "parameters": "its parameters",
            "schedule": "the lr schedule", "augmentation": "the training augmentation",
            "train_samples": "training images", "test_samples": "test images",
            "best_validation_top1_error": "the best epoch's top-1 error on the evaluation split (%)",
            "test_top1_error": "top-1 error of the final model (%)", "test_top5_error": "top-5 error (%)",
            "images_per_second": "training images per second",
            "data_images_per_second": "images per second of loading plus augmentation alone",
            "data_pipeline_headroom": "data_images_per_second / images_per_second",
        },
        epoch_metric="validation_top1_error",
        epoch_metric_label="top-1 error (%)",
        columns=(Column("best_validation_top1_error", "best val top-1 err %", "{:.2f}"),
                 Column("test_top1_error", "top-1 err %", "{:.2f}"), Column("test_top5_error", "top-5 err %", "{:.2f}"),
                 Column("seconds_per_epoch", "s/epoch", "{:.1f}"), Column("images_per_second", "images/s", "{:,.0f}")),
    ),
}
STAMP = ("command", "device", "date")  # added by write_results, not by the recipe


def schema(task: str) -> TaskSchema:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} in results.json; known: {', '.join(TASKS)}")
    return TASKS[task]


def record(task: str, **values) -> dict:
    """A task's record, checked against its schema: every key it lists (but the stamp) and no other."""
    expected = set(schema(task).all_keys) - set(STAMP) - {"task"}
    missing, unknown = sorted(expected - set(values)), sorted(set(values) - expected)
    if missing or unknown:
        raise ValueError(f"{task} results do not match koala_hf.recipe_support.results.TASKS: "
                         f"missing {missing or 'nothing'}, not in the schema {unknown or 'nothing'}")
    return {"task": task, **values}


def validate(results: dict, where: str = "results.json") -> dict:
    """``results`` if it holds every key of its task's schema, else ``ValueError`` naming what it lacks."""
    missing = sorted(set(schema(results.get("task", "?")).all_keys) - set(results))
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}: was it written by an older recipe? Run it again.")
    return results


def load_results(path: str | Path) -> dict:
    """A run folder's (or a file's) ``results.json``, validated."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() or not path.suffix else path
    if not file.exists():
        raise FileNotFoundError(f"{path} has no results.json: pass the --output_dir of a finished recipe run")
    return validate(json.loads(file.read_text()), str(file))


# ------------------------------------------------------------------ the stamp
def describe_device(device: str | None = None) -> str:
    """The hardware a run measured: the GPUs when it ran on CUDA, else the CPU and its threads."""
    if (device is None or device.startswith("cuda")) and torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def command_line(script: str, argv: list[str] | None, root: str | Path | None = None) -> str:
    """The command that reproduces a run: the script (relative to ``root``, by default the current directory
    when the script lies under it, else as given) and its arguments."""
    path = Path(script).resolve()
    base = Path(root or Path.cwd()).resolve()
    shown = path.relative_to(base) if path.is_relative_to(base) else Path(script)
    return shlex.join(["python", str(shown)] + list(sys.argv[1:] if argv is None else argv))


def provenance(script: str, argv: list[str] | None, device: str | None = None, root: str | Path | None = None) -> dict:
    """What stamps every results file: the exact command, the device and the date."""
    return {
        "command": command_line(script, argv, root),
        "device": describe_device(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_results(output_dir: str | Path, results: dict, stamp: dict) -> Path:
    """``results.json`` with the run's record plus its :func:`provenance`."""
    results = validate({**results, **stamp}, "the record")
    path = Path(output_dir) / "results.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    return path


def write_report(output_dir: str | Path, stem: str, report: dict, markdown: str) -> None:
    """A benchmark's ``<stem>.json`` and ``<stem>.md`` in ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(markdown)
