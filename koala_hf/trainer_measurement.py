"""How KoalaTrainer's loss reaches the KOALA step: one route (:class:`Route`), held by one object (:class:`TrainerMeasurement`).

KOALA measures the loss (E1): each optimizer step needs the mean loss of the micro-batches that gave it
gradient, and the per-sample losses for the noise measurement (E1a-E1c). A ``KoalaTrainer`` measures by one of
these routes:

``Route.UNCHECKED``
    The start, when per-sample losses can be read: ``compute_loss`` is KoalaTrainer's own (or
    ``per_sample_losses`` is overridden). The first training micro-batch derives them from the forward's outputs
    and checks that they average to the loss ``compute_loss`` returned (:func:`check_per_sample_losses`); the
    check moves the route to one of the three below, once.
``Route.PER_SAMPLE``
    Each micro-batch's per-sample losses are observed as it is computed (``optimizer.observe(mean, losses)``).
``Route.RESCALED``
    As ``PER_SAMPLE``; the model takes ``**kwargs`` but ignores ``num_items_in_batch`` (T5, BART), so the loss
    it returns, its micro-batch's own mean, is rescaled to the step's token normalisation that the Trainer
    expects.
``Route.BACKPROPAGATED``
    No usable per-sample losses (none derivable, or not averaging to the loss; or a ``compute_loss`` in front of
    KoalaTrainer's): the loss each micro-batch back-propagated is summed over the step and observed just before
    the optimizer step; the noise measurement falls back to ``L^2``.

A micro-batch of a per-sample route whose losses cannot be read (several forward passes) contributes its
back-propagated loss, as ``BACKPROPAGATED`` does. Every fallback is said once, with its cause.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

FALLBACK = ("KOALA measures the loss the Trainer back-propagated instead (exact), and its noise measurement falls "
            "back to loss**2 (E1). Override KoalaTrainer.per_sample_losses to provide per-sample losses.")


class Route(enum.Enum):
    UNCHECKED = "per-sample losses, not checked yet"
    PER_SAMPLE = "per-sample losses"
    RESCALED = "per-sample losses, the model's loss rescaled to the step's token normalisation"
    BACKPROPAGATED = "the back-propagated loss"

    @property
    def per_sample(self) -> bool:
        """Per-sample losses are derived on this route (checked or still to be)."""
        return self is not Route.BACKPROPAGATED


@dataclass
class TrainerMeasurement:
    """The route, and what the current optimizer step has measured so far."""

    route: Route
    noticed: bool = False  # a fallback was said (once per run)
    in_training_step: bool = False  # between training_step's start and end: compute_loss is the training forward's
    observed: bool = False  # the current micro-batch's per-sample losses were observed
    backpropagated: torch.Tensor | None = None  # the step's summed back-propagated loss (its micro-batches' sum)

    def begin_micro_batch(self) -> None:
        self.in_training_step, self.observed = True, False

    def end_micro_batch(self, loss: torch.Tensor) -> bool:
        """Close a micro-batch that returned ``loss`` (already divided for accumulation): when its per-sample losses
        were not observed, add it to the back-propagated sum and return ``True``."""
        self.in_training_step = False
        if self.observed:
            return False
        contribution = loss.detach().float()
        self.backpropagated = contribution if self.backpropagated is None else self.backpropagated + contribution
        return True

    def observe_per_sample(self, optimizer, losses: torch.Tensor) -> None:
        optimizer.observe(losses.mean(), losses)
        self.observed = True

    def feed(self, optimizer) -> None:
        """Before the optimizer step: observe the back-propagated sum, if the step has one."""
        if self.backpropagated is not None:
            optimizer.observe(self.backpropagated)
            self.backpropagated = None

    def settle(self, route: Route, notice: str | None) -> None:
        """The first micro-batch's check decided ``route`` (:func:`check_per_sample_losses`); say ``notice``."""
        self.route = route
        self.notice(notice)

    def notice(self, message: str | None) -> None:
        """Say ``message`` (a fallback's cause, or the rescaling), unless one was said already."""
        if message is not None and not self.noticed:
            self.noticed = True
            logger.warning(message)


def check_per_sample_losses(losses, loss, *, num_items_in_batch, normalised: bool, num_processes: int,
                            forwards: int, trainer: str, model: str) -> tuple[Route, str | None]:
    """The route the first micro-batch's per-sample ``losses`` (or ``None``) decide, against the ``loss``
    ``compute_loss`` returned, and the notice to give (``None``: none). ``normalised``: the model takes the step's
    token count (``num_items_in_batch``), so the loss is the token sum over it. The one host read of the run."""
    if losses is None:
        cause = (f"{forwards} forward passes computed this loss" if forwards != 1 else
                 "the training forward's outputs give none (no logits, log-probabilities or labels)")
        return Route.BACKPROPAGATED, f"{trainer}: no per-sample losses: {cause}. {FALLBACK}"
    # With average_tokens_across_devices the token count is every process's, and the Trainer multiplies
    # the loss (in place) by the number of processes, so that averaging the gradients undoes it.
    scales = {1.0, float(num_processes)}
    normalised = normalised and num_items_in_batch is not None
    candidates = [losses.mean().float()] + ([losses.sum().float() / num_items_in_batch] if normalised else [])
    *derived, reported = torch.stack([c.to(loss.device) for c in candidates] + [loss.detach().float()]).tolist()

    def matches(value: float) -> bool:
        return any(abs(value * scale - reported) <= 1e-3 * abs(reported) + 1e-6 for scale in scales)

    if normalised and matches(derived[1]):
        return Route.PER_SAMPLE, None
    if matches(derived[0]):
        if normalised and abs(derived[0] - derived[1]) > 1e-3 * abs(derived[0]) + 1e-6:
            return Route.RESCALED, (
                f"{trainer}: {model} takes **kwargs but ignores num_items_in_batch: its loss is each micro-batch's "
                "own token mean, and the Trainer, expecting a loss normalised by the step's token count, does not "
                f"divide it by the accumulation steps. {trainer} rescales it to the step's token normalisation, so "
                "that the gradient is that of the step's token mean, which KOALA measures per token.")
        return Route.PER_SAMPLE, None
    expected = derived[1] if normalised else derived[0]
    return Route.BACKPROPAGATED, (
        f"{trainer}: the loss compute_loss returned ({reported:.6g}) is not the mean of the per-sample losses "
        f"derived from the model's outputs ({expected:.6g}): a custom or weighted loss, an auxiliary term, or a "
        f"loss type KoalaTrainer does not read (for TRL's, use koala_hf.KoalaSFTTrainer). {FALLBACK}")
