"""``KoalaTrainingArguments``: ``TrainingArguments`` plus the KOALA variant and its hyperparameters."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from transformers import TrainingArguments

from koala_hf.optim.base import constructor_defaults
from koala_hf.registry import optimizer_entry


def trainer_optim_chosen(args: TrainingArguments) -> bool:
    """Whether ``args.optim`` was set away from its default: a Trainer optimizer was asked for (a baseline)."""
    default = type(args).__dataclass_fields__["optim"].default
    value = getattr(args.optim, "value", args.optim)
    return value != getattr(default, "value", default)


@dataclass
class KoalaTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for :class:`koala_hf.KoalaTrainer`.

    ``koala_optimizer`` names the variant (KOALA++ when unset). ``learning_rate`` left unset means the
    variant's own default (KOALA++ 1.0, KOALA-V 0.1, KOALA-M 1.0), not the Trainer's 5e-5. ``weight_decay`` is
    the Trainer's (biases and norm weights get none) and enters KOALA as E3. An ``optim`` set away from its
    default asks for a Trainer optimizer instead (a baseline run, at the Trainer's default learning rate unless
    given); naming both that and ``koala_optimizer`` is refused.
    """

    learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate; unset: the KOALA variant's own default."}
    )
    koala_optimizer: str | None = field(
        default=None,
        metadata={"help": "koala++ (unset: this), koala++ns, koala-v or koala-m (timm spellings accepted)."},
    )
    koala_sigma: float | None = field(default=None, metadata={"help": "Initial uncertainty sigma (KOALA++, KOALA-V)."})
    koala_q: float | None = field(default=None, metadata={"help": "Process noise q (KOALA++, KOALA-V)."})
    koala_r: float | None = field(default=None, metadata={"help": "Fixed measurement noise r; unset: estimated (E2)."})
    koala_alpha_r: float | None = field(default=None, metadata={"help": "Running-average factor of the noise estimate (E2)."})
    koala_noise: str | None = field(
        default=None, metadata={"help": "Loss-noise measurement: second_moment (E1a, default), variance (E1b) or none (E1c)."}
    )
    koala_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": 'Other optimizer arguments as JSON, e.g. KOALA-M\'s \'{"sw": 0.1, "a": 0.9}\'.'},
    )

    def __post_init__(self):
        self.koala_optimizer_chosen = self.koala_optimizer is not None
        baseline = trainer_optim_chosen(self)
        if baseline and self.koala_optimizer_chosen:
            raise ValueError(
                f"KoalaTrainingArguments got optim={self.optim!r} (a Trainer optimizer) and koala_optimizer="
                f"{self.koala_optimizer!r}: choose one (leave optim unset to train KOALA)"
            )
        self.koala_optimizer = self.koala_optimizer or "koala++"
        entry = optimizer_entry(self.koala_optimizer)  # refuses unknown names early
        if self.learning_rate is None:
            if baseline:
                self.learning_rate = TrainingArguments.__dataclass_fields__["learning_rate"].default
            else:
                self.learning_rate = constructor_defaults(entry.cls)["lr"]
        if isinstance(self.koala_kwargs, str):
            self.koala_kwargs = json.loads(self.koala_kwargs)
        super().__post_init__()
        self.koala_optimizer_kwargs()  # refuses arguments the variant does not take

    def koala_optimizer_kwargs(self) -> dict:
        """Keyword arguments for the chosen optimizer, without its ``params``."""
        entry = optimizer_entry(self.koala_optimizer)
        kwargs = dict(entry.defaults)
        named = {"sigma": self.koala_sigma, "q": self.koala_q, "r": self.koala_r, "alpha_r": self.koala_alpha_r,
                 "noise": self.koala_noise}
        kwargs.update({k: v for k, v in named.items() if v is not None})
        kwargs.update(self.koala_kwargs or {})
        kwargs["lr"] = self.learning_rate
        accepted = set(constructor_defaults(entry.cls))
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ValueError(
                f"{self.koala_optimizer} does not take {', '.join(unknown)}; its arguments are: {', '.join(sorted(accepted))}"
            )
        return kwargs
