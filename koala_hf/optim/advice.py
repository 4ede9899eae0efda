"""Advice while it trains: what KOALA's own signals say about its setting, said once, with the figure behind it.

:meth:`~koala_hf.optim.base.KoalaOptimizer.diagnostics` hands every reading of the signals to the optimizer's
:class:`TrainingAdvisor` (so ``KoalaTrainer``'s logs and a plain loop that logs ``diagnostics()`` both get it).
A sign counts only when it holds at every reading over at least ``window`` steps, so one noisy log is never
enough. Each piece of advice is logged once per optimizer, as a warning of the ``koala_hf`` logger.

The signs (what the guidance sweep, docs/guidance.md, shows to mean a poor setting):

- ``noise_dominates``: KOALA++'s loss-noise estimate ``R`` makes at least ``NOISE_SHARE`` of the innovation
  variance ``S`` (E15), so each step is a plain SGD step of ``lr * L / R * (sigma + q)`` (E16 with ``S ~ R``),
  set by the loss noise rather than by the filter. Raise ``lr``, or let ``R`` fade with ``noise="none"`` (E1c).
  Not while steps are skipped (a skipped step leaves ``S`` as it was).
- ``skipping``: at least ``SKIPPED_SHARE`` of the steps are skipped for a non-finite loss or non-finite sums
  (negative losses have their own warning): the lr is too high, or the loss overflows in half precision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger("koala_hf")

NOISE_SHARE = 0.9  # R / S at or above this: the step is SGD's, its size set by R
SKIPPED_SHARE = 0.1  # skipped steps (negative losses aside) at or above this share of all steps
WINDOW = 200  # steps a sign must last, at every reading, before it is said


@dataclass(frozen=True)
class Reading:
    """What one ``diagnostics()`` call saw: its signals, and the step counters of the filter-wide state."""

    signals: dict[str, float]
    steps: int  # steps taken and skipped so far
    skipped: int  # skipped for a non-finite loss or sums (negative losses not counted)
    sigma_plus_q: float | None = None  # KOALA++'s sigma + q, the scale of its SGD-like step (E16)


class TrainingAdvisor:
    """Watches the readings of one optimizer and logs each piece of advice once (see the module docstring)."""

    def __init__(self, optimizer: str, window: int = WINDOW):
        self.optimizer = optimizer
        self.window = window
        self.given: set[str] = set()
        self._noisy_since: Reading | None = None  # the first of the current run of noise-dominated readings
        self._first: Reading | None = None

    def read(self, reading: Reading) -> list[str]:
        """Take one reading; return (and log) the advice it triggers for the first time."""
        advice = [message for message in (self._noise_dominates(reading), self._skipping(reading)) if message]
        for message in advice:
            logger.warning(message)
        return advice

    def _once(self, name: str, message: str) -> str | None:
        if name in self.given:
            return None
        self.given.add(name)
        return message

    def _noise_dominates(self, reading: Reading) -> str | None:
        share = reading.signals.get("koala/noise_share")
        start = self._noisy_since
        if share is None or share < NOISE_SHARE:
            self._noisy_since = None
            return None
        if start is None or reading.skipped > start.skipped:  # a skipped step leaves S as it was: start again
            self._noisy_since = reading
            return None
        lasted = reading.steps - start.steps
        if lasted < self.window:
            return None
        effective = reading.signals["koala/effective_step"]
        sgd = "" if reading.sigma_plus_q is None else (
            f" of about lr*L/R*(sigma+q) = {effective / share * reading.sigma_plus_q:.3g}")
        return self._once("noise_dominates", (
            f"{self.optimizer}: the loss-noise estimate R has made {share:.0%} of the innovation variance S "
            f"(koala/noise_share >= {NOISE_SHARE}) at every log for the last {lasted} steps "
            f"(koala/effective_step {effective:.3g}), so each step is a plain SGD step without momentum{sgd}, "
            "set by the loss noise rather than by the filter. If training is slow, raise lr, tenfold or more "
            "(on a small CNN trained from scratch E1a worked best at lr 10 to 30, and every noise='none' run "
            "failed), or, on a language model, let R fade with noise='none' (E1c). The guidance page (How to set "
            "KOALA) lists the lrs that worked per task."))

    def _skipping(self, reading: Reading) -> str | None:
        if self._first is None:
            self._first = reading
        steps = reading.steps - self._first.steps
        skipped = reading.skipped - self._first.skipped
        if steps < self.window or skipped < SKIPPED_SHARE * steps:
            return None
        return self._once("skipping", (
            f"{self.optimizer}: {skipped} of the last {steps} steps were skipped ({skipped / steps:.0%}, "
            "koala/skipped_steps) because the loss or the step's sums were not finite; a skipped step changes "
            "nothing. Lower lr, clip gradients (max_grad_norm), or check for overflow in half precision."))
