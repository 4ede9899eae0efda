"""The loss measurement KOALA filters on (spec E1).

KOALA treats the minibatch loss as a noisy scalar measurement of a target loss.
Each optimizer step needs the mean loss ``L_k`` over every sample that
contributed gradient to it and the noise measurement ``m_k = mean_i(l_i^2)``
over the same samples, falling back to ``L_k^2`` when per-sample losses are not
available (E1). Samples can arrive in several pieces (gradient-accumulation
micro-batches) and on several processes (data parallelism):
:class:`LossMeasurement` sums them locally and reduces them across processes in
one collective when the step consumes them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# The measurement's sums, in this order (one small tensor, reduced in one collective): every path reads them by
# these names (the fused scalar kernels get their positions as STAT_* constants, stat_constants).
STATS = ("loss_sum", "square_sum", "count", "fallbacks")


def stack_stats(**columns: torch.Tensor) -> torch.Tensor:
    """The sums as one tensor, in :data:`STATS` order."""
    return torch.stack([columns[name] for name in STATS])


def stat_constants() -> dict[str, int]:
    """The sums' positions as a kernel's constants (``STAT_LOSS_SUM`` ...)."""
    return {f"STAT_{name.upper()}": index for index, name in enumerate(STATS)}


class LossMeasurement:
    """Accumulates ``observe`` calls until an optimizer step consumes them.

    ``process_group`` is the group the statistics are summed over when
    ``torch.distributed`` is initialised with more than one process (the default
    group when ``None``). Set it to ``False`` for processes that train
    independent models and must not share a measurement.
    """

    def __init__(self) -> None:
        self.process_group = None
        self.observations = 0
        self._stats: torch.Tensor | None = None
        self._per_sample: bool | None = None

    @property
    def pending(self) -> bool:
        return self._stats is not None

    def discard(self) -> None:
        """Forget a measurement no step consumed (e.g. a step skipped by a grad scaler)."""
        self._stats = None
        self._per_sample = None

    @torch.no_grad()
    def observe(self, loss, per_sample_losses: torch.Tensor | None = None, device=None) -> None:
        """Record the loss of one (micro-)batch.

        ``loss`` is the batch's mean loss, the value whose gradient was taken,
        before any division for gradient accumulation. ``per_sample_losses``
        holds the loss of every sample (or token) that contributed to it; when
        given, the batch counts with their number and their squares measure the
        noise (E1). Without them the batch counts as one sample and the noise
        falls back to ``L_k^2``.
        """
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss), device=device)
        if loss.numel() != 1:
            raise ValueError(
                f"observe() needs the batch's scalar mean loss, got a tensor of shape {tuple(loss.shape)}; "
                "pass per-sample losses as per_sample_losses="
            )
        loss = loss.detach().reshape(())
        dtype = torch.promote_types(loss.dtype, torch.float32)
        per_sample = per_sample_losses is not None
        if self._per_sample is not None and self._per_sample != per_sample:
            raise ValueError(
                "observe() was called both with and without per_sample_losses before one step; "
                "give per-sample losses for every micro-batch of a step or for none"
            )
        if per_sample:
            if not isinstance(per_sample_losses, torch.Tensor):
                raise TypeError("per_sample_losses must be a tensor of per-sample (or per-token) losses")
            samples = per_sample_losses.detach().reshape(-1).to(device=loss.device, dtype=dtype)
            if samples.numel() == 0:
                raise ValueError("per_sample_losses is empty: a batch with no samples carries no measurement")
            count = samples.numel()
            stats = stack_stats(
                loss_sum=loss.to(dtype) * count,
                square_sum=torch.dot(samples, samples),
                count=torch.full((), float(count), dtype=dtype, device=loss.device),  # a fill, not a host copy
                fallbacks=torch.zeros((), dtype=dtype, device=loss.device),
            )
        else:
            value = loss.to(dtype)
            one = torch.ones((), dtype=dtype, device=loss.device)
            stats = stack_stats(loss_sum=value, square_sum=value * value, count=one, fallbacks=one)
        if self._stats is None:
            self._stats = stats
        else:
            if self._stats.device != stats.device:
                stats = stats.to(self._stats.device)
            self._stats = self._stats + stats.to(self._stats.dtype)
        self._per_sample = per_sample
        self.observations += 1

    def consume(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(L_k, m_k)`` over every sample on every process, and reset (E1).

        No value is read back to the host: the fallback choice is a masked select.
        """
        return loss_and_noise(self.consume_stats())

    def consume_stats(self) -> torch.Tensor:
        """The measurement's sums over every sample on every process (``loss_sum, square_sum, count, fallbacks``,
        what :func:`loss_and_noise` turns into E1's ``(L_k, m_k)``), and reset."""
        stats = self._stats
        if stats is None:
            raise RuntimeError("no loss measurement is pending")
        self.discard()
        group = self.process_group
        if group is not False and dist.is_available() and dist.is_initialized():
            if dist.get_world_size(group) > 1:
                stats = stats.clone()
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        return stats


def loss_and_noise(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E1's ``(L_k, m_k)`` from a measurement's sums (:meth:`LossMeasurement.consume_stats`): the mean loss, and the
    mean squared per-sample loss, or ``L_k^2`` where a micro-batch gave no per-sample losses."""
    sums = dict(zip(STATS, stats.unbind()))
    mean_loss = sums["loss_sum"] / sums["count"]
    noise = torch.where(sums["fallbacks"] > 0, mean_loss * mean_loss, sums["square_sum"] / sums["count"])
    return mean_loss, noise
