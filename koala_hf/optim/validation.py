"""Hyperparameter checks shared by the KOALA optimizers: each raises ``ValueError`` naming the value and its range."""

from __future__ import annotations

import math

import torch

# The loss-noise measurements (spec E1a-E1c).
NOISE_MODES = ("second_moment", "variance", "none")


def check_range(name: str, value, low=None, high=None, *, low_open=False, high_open=False) -> None:
    """Raise ``ValueError`` naming ``name`` and its allowed range unless ``value`` lies in it."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = value.item()  # hyperparameters are checked once, at construction, never inside step()
    inside = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if inside and low is not None:
        inside = value > low if low_open else value >= low
    if inside and high is not None:
        inside = value < high if high_open else value <= high
    if not inside:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        low_text = "-inf" if low is None else low
        high_text = "inf" if high is None else high
        raise ValueError(f"Invalid {name}: {value!r}; it must be a finite number in {left}{low_text}, {high_text}{right}")


def check_prior(group: dict) -> None:
    """The initial uncertainty ``sigma`` (``P_0 = sigma``) and the process noise ``q``."""
    check_range("sigma", group["sigma"], 0.0, low_open=True)
    check_range("q", group["q"], 0.0)


def check_noise(group: dict) -> None:
    """The measurement-noise hyperparameters ``noise`` (E1a-E1c), ``r`` and ``alpha_r`` (E2)."""
    if group["noise"] not in NOISE_MODES:
        raise ValueError(f"Invalid noise: {group['noise']!r}; it must be one of {', '.join(NOISE_MODES)} (spec E1a-E1c)")
    if group["r"] is not None:
        check_range("r", group["r"], 0.0, low_open=True)
    check_range("alpha_r", group["alpha_r"], 0.0, 1.0, high_open=True)
