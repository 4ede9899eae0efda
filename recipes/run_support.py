"""What the recipes share: optimizers by name with the papers' settings, epoch timing, results files.

Every recipe builds its optimizer through :func:`optimizer_cls_and_kwargs`, so
KOALA and the baselines get the Trainer's parameter groups (no weight decay on
biases and norms), the same data order, schedule and seed.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import platform
import shlex
import socket
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


def canonical_optimizer_name(name: str) -> str:
    """``koala++``, ``koalapp`` (timm's spelling), ``KOALA-M`` ... -> the name the recipes' settings use."""
    key = name.lower()
    if key in BASELINES:
        return key
    try:
        entry = optimizer_entry(key)
    except ValueError:
        known = ", ".join(list(OPTIMIZER_CHOICES) + [e.timm_name for e in OPTIMIZERS.values()])
        raise SystemExit(f"--optimizer {name!r} is unknown; choose one of: {known}") from None
    return next(n for n, e in OPTIMIZERS.items() if e is entry)


def parse_optimizer_kwargs(text: str | None) -> dict:
    """``--optimizer_kwargs`` as a dict, or a one-line error saying what JSON is expected."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--optimizer_kwargs is not valid JSON ({error.msg} at character {error.pos}): "
                         f"give an object such as '{{\"sigma\": 0.2, \"q\": 0.2}}'") from None
    if not isinstance(value, dict):
        raise SystemExit(f"--optimizer_kwargs must be a JSON object such as '{{\"sigma\": 0.2}}', got {text!r}")
    return value


def optimizer_cls_and_kwargs(name: str, settings: dict, overrides: dict | None = None):
    """``(class, kwargs)`` for the Trainer: ``settings`` are the task's defaults per optimizer name.

    Refuses an argument the optimizer does not take, naming the ones it does.
    """
    name = canonical_optimizer_name(name)
    kwargs = dict(settings.get(name, {}))
    kwargs.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if name in BASELINES:
        cls = BASELINES[name]
    else:
        entry = optimizer_entry(name)
        cls, kwargs = entry.cls, {**entry.defaults, **kwargs}
    accepted = set(inspect.signature(cls).parameters) - {"params"}
    unknown = sorted(set(kwargs) - accepted - {"weight_decay"})
    if unknown:
        raise SystemExit(f"--optimizer_kwargs: {name} does not take {', '.join(unknown)}; "
                         f"its arguments are {', '.join(sorted(accepted))}")
    return cls, kwargs


def all_hyperparameters(cls, kwargs: dict) -> dict:
    """Every constructor argument of ``cls`` with the value this run used (its default where unset)."""
    values = {name: p.default for name, p in inspect.signature(cls).parameters.items()
              if name != "params" and p.default is not inspect.Parameter.empty}
    return {**values, **kwargs}


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for the recipes: unset values come from the preset and the optimizer's settings.

    Evaluates and checkpoints every epoch and keeps the best-validation model
    (the papers' protocol); everything else is the Trainer's. With
    ``--save_strategy no`` there is no checkpoint to go back to, so the final
    model is the one evaluated (``results.json`` says which). The optimizer is
    chosen with the recipe's ``--optimizer``; the Trainer's own ``--optim`` is
    refused rather than silently ignored.
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
    logging_steps: float | None = field(default=None, metadata={"help": "Unset: about 8 logs per epoch (at most every 10 steps)."})
    output_dir: str | None = "runs/latest"

    def __post_init__(self):
        if self.optim != TrainingArguments.__dataclass_fields__["optim"].default:
            raise SystemExit(f"--optim {self.optim} is the Trainer's optimizer flag, which the recipes do not use: "
                             f"choose the optimizer with --optimizer ({', '.join(OPTIMIZER_CHOICES)}) and tune it "
                             "with --learning_rate, --weight_decay and --optimizer_kwargs")
        if self.save_strategy == "no" and self.load_best_model_at_end:
            print("--save_strategy no: no checkpoints, so the final model (not the best epoch's) is saved and tested")
            self.load_best_model_at_end = False
        if not _accelerator_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
        self._auto_logging = self.logging_steps is None
        if self._auto_logging:
            self.logging_steps = 10  # replaced by scale_logging() once the run's length is known
        super().__post_init__()

    def scale_logging(self, steps_per_epoch: int) -> None:
        """Unless ``--logging_steps`` was given: about 8 training-loss points per epoch, at most 10 steps apart."""
        if self._auto_logging:
            self.logging_steps = max(1, min(10, steps_per_epoch // 8))

    @property
    def evaluated_model(self) -> str:
        return "best validation epoch" if self.load_best_model_at_end else "final"

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
        chosen = {**settings.get(canonical_optimizer_name(name), {}), **overrides}
        if self.learning_rate is None:
            self.learning_rate = chosen.get("lr", 1e-3)
        if self.weight_decay is None:
            self.weight_decay = chosen.get("weight_decay", 0.0)
        # The Trainer applies weight decay per parameter group (none for biases and norms).
        kwargs = {k: v for k, v in chosen.items() if k != "weight_decay"}
        kwargs["lr"] = self.learning_rate
        return optimizer_cls_and_kwargs(name, {}, kwargs)


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    return torch.cuda.is_available()


def use_the_machines_cores() -> int:
    """On CPU, one thread per core for each local process; return the threads in use.

    ``accelerate launch`` sets ``OMP_NUM_THREADS=1`` unless told otherwise, which
    trains on one core; a value the user exported is left alone.
    """
    if _accelerator_available():
        return torch.get_num_threads()
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    if launched_by_accelerate and os.environ.get("OMP_NUM_THREADS") == "1":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.get_num_threads()


def launcher() -> str:
    """How this process was started: ``accelerate launch``, ``torchrun`` or ``python``."""
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        return "accelerate launch"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    return "python"


def require_hub(what: str, fix: str) -> None:
    """Fail at once, not after minutes of retries, when the Hub is off (``HF_HUB_OFFLINE``) or unreachable."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):
        raise SystemExit(f"{what} needs the Hub, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set. {fix}")
    endpoint = constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = endpoint.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=5).close()
    except OSError as error:
        raise SystemExit(f"{what} needs the Hub, but {host} cannot be reached ({error}). {fix}") from None


def explicitly_given(argv: list[str] | None, option: str) -> bool:
    """Whether ``--option`` appears on the command line (``--option v`` or ``--option=v``)."""
    args = sys.argv[1:] if argv is None else argv
    return any(a == f"--{option}" or a.startswith(f"--{option}=") for a in args)


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
        "cpu_threads": None if _accelerator_available() else torch.get_num_threads(),
    }


ROOT = Path(__file__).resolve().parents[1]


def describe_device(device: str | None = None) -> str:
    """The hardware a run measured: the GPUs when it ran on CUDA, else the CPU and its threads."""
    if (device is None or device.startswith("cuda")) and torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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
