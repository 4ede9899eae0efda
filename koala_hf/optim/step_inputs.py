"""What a step measured, handed to the variant's update: raw for a fused scalar step, computed for the others.

A step starts from the measurement's sums (E1, koala_hf.measurement) and the filter-wide state. The eager
path computes from them the mean loss ``L_k``, the noise measurement ``m_k``, each group's noise estimate
``R_k`` (E2, koala_hf.optim.noise) and whether the step may be taken (:attr:`StepInputs.measured`, on first
use), and after the update records them in the state (:meth:`StepInputs.record`). A fused scalar step (one
kernel, koala_hf.optim.triton_kernels) reads the sums and the state itself, writes ``R``, the counters and
the loss in place, and says so (:meth:`StepInputs.recorded_by_kernel`): then nothing here runs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from koala_hf.measurement import loss_and_noise
from koala_hf.optim.noise import noise_estimates


class Measured(NamedTuple):
    loss: torch.Tensor  # L_k, in the state's dtype (E1)
    noise: torch.Tensor  # m_k (E1)
    estimates: torch.Tensor  # R_k per group (E2)
    negative: torch.Tensor  # L_k < 0: measured against a target of 0, the step would climb
    ok: torch.Tensor  # the step may be taken: L_k and m_k finite, L_k not negative


class StepInputs:
    """One step's measurement sums (``stats``), the filter-wide ``state`` and the ``groups`` (see the module)."""

    def __init__(self, stats: torch.Tensor, state: dict, groups: list[dict]):
        self.stats, self.state, self.groups = stats, state, groups
        self._recorded = False

    @functools.cached_property
    def measured(self) -> Measured:
        """E1 and E2 computed with torch ops, on the device, nothing read back to the host."""
        previous = self.state["R"]
        mean_loss, noise = (t.to(device=previous.device, dtype=previous.dtype) for t in loss_and_noise(self.stats))
        estimates = noise_estimates(self.groups, previous, noise, mean_loss)  # E2
        negative = mean_loss < 0
        ok = torch.isfinite(mean_loss) & torch.isfinite(noise) & ~negative
        return Measured(mean_loss, noise, estimates, negative, ok)

    def recorded_by_kernel(self) -> None:
        """A fused scalar step has written ``R``, the step counters and the loss itself."""
        self._recorded = True

    def record(self, ok: torch.Tensor) -> None:
        """The state after a step the update narrowed to ``ok``: ``R`` where taken, the counters, the loss."""
        if self._recorded:
            return
        state, measured = self.state, self.measured
        state["R"] = torch.where(ok, measured.estimates, state["R"])
        state["skipped_steps"].add_(~ok)
        state["negative_loss_steps"].add_(measured.negative)
        state["step"].add_(ok)  # steps taken; skipped ones are counted apart
        state["loss"] = torch.where(ok, measured.loss, state["loss"])
