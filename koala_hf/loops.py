"""KOALA in a hand-written Accelerate (or plain torch) training loop.

``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer``,
which hides :meth:`~koala_hf.KoalaOptimizer.observe`. :func:`observe` reaches
through the wrapper::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for batch in loader:
        with accelerator.accumulate(model):
            outputs = model(**batch)
            accelerator.backward(outputs.loss)
            koala_hf.observe(optimizer, outputs.loss,
                             koala_hf.per_sample_losses(outputs, batch["labels"], shift_labels=True))
            optimizer.step()       # skipped by Accelerate until the last micro-batch
            optimizer.zero_grad()  # likewise; also drops a measurement a grad scaler skipped

Pass the micro-batch's unscaled mean loss: Accelerate divides by the
accumulation steps for the backward pass only, and the step measures the mean
over every micro-batch (E1).
"""

from __future__ import annotations

import torch

from koala_hf.optim.base import KoalaOptimizer


def koala_optimizer(optimizer) -> KoalaOptimizer | None:
    """The KOALA optimizer inside ``optimizer`` (an Accelerate or other wrapper), or ``None``."""
    seen = 0
    while not isinstance(optimizer, KoalaOptimizer) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer if isinstance(optimizer, KoalaOptimizer) else None


def observe(optimizer, loss: torch.Tensor, per_sample_losses: torch.Tensor | None = None) -> None:
    """Record the loss of one micro-batch on the KOALA optimizer inside ``optimizer``."""
    inner = koala_optimizer(optimizer)
    if inner is None:
        raise TypeError(f"{type(optimizer).__name__} is not a KOALA optimizer nor a wrapper around one")
    inner.observe(loss, per_sample_losses)
