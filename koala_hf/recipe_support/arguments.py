"""``RecipeTrainingArguments``: the Trainer's arguments as the recipes use them."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments

from koala_hf.recipe_support.machine import accelerator_available
from koala_hf.recipe_support.optimizers import OPTIMIZER_CHOICES, canonical_optimizer_name, optimizer_cls_and_kwargs


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
        if not accelerator_available():
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


def explicitly_given(argv: list[str] | None, option: str) -> bool:
    """Whether ``--option`` appears on the command line (``--option v`` or ``--option=v``)."""
    args = sys.argv[1:] if argv is None else argv
    return any(a == f"--{option}" or a.startswith(f"--{option}=") for a in args)
