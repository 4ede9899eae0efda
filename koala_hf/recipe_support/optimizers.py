"""Optimizers by name for the recipes: KOALA's registry plus the papers' baselines, with the task's settings.

Every recipe builds its optimizer through :func:`optimizer_cls_and_kwargs`, so KOALA and the baselines get
the Trainer's parameter groups (no weight decay on biases and norms), the same data order, schedule and seed.
"""

from __future__ import annotations

import inspect
import json

import torch

from koala_hf.optim.base import constructor_defaults
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
    accepted = set(constructor_defaults(cls))
    unknown = sorted(set(kwargs) - accepted - {"weight_decay"})
    if unknown:
        raise SystemExit(f"--optimizer_kwargs: {name} does not take {', '.join(unknown)}; "
                         f"its arguments are {', '.join(sorted(accepted))}")
    return cls, kwargs


def all_hyperparameters(cls, kwargs: dict) -> dict:
    """Every constructor argument of ``cls`` with the value this run used (its default where unset)."""
    values = {name: default for name, default in constructor_defaults(cls).items() if default is not inspect.Parameter.empty}
    return {**values, **kwargs}
