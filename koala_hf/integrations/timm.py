"""timm's ``train.py`` with the KOALA optimizers: every training micro-batch's loss reaches the step (E1).

One added line in ``train.py``, after it creates its optimizer (``task`` and ``optimizer`` are in scope)::

    koala_hf.integrations.timm.feed_losses(task, optimizer)

or ``train.py`` unchanged, through the launcher (which does the same for the optimizer
``timm.optim.create_optimizer_v2`` builds and every timm task)::

    python -m koala_hf.integrations.timm path/to/train.py --opt koalapp --lr 1.0 ...   # train.py's own arguments

timm's ``train.py`` computes each micro-batch's loss in a training task (``result = task(input, target)``, a
``timm.task.TrainingTask``) and steps the optimizer without ever handing it that loss; a KOALA step needs it.
Every training forward of the task (in train mode, with gradients; nothing during validation) is observed on
the KOALA optimizer: ``result["loss"]``, the micro-batch's mean before ``train.py`` divides it for
``--grad-accum-steps``, and, for a :class:`timm.task.ClassificationTask` whose criterion is
``nn.CrossEntropyLoss`` (with or without ``label_smoothing``), timm's ``LabelSmoothingCrossEntropy`` or
``SoftTargetCrossEntropy`` (Mixup/CutMix), the per-sample losses (:func:`per_sample_losses`), checked once
against ``result["loss"]``. Any other criterion or task (binary cross-entropy, distillation, a class weight)
is measured by its mean loss, and the noise falls back to ``loss**2`` (E1); that is said once, with the cause.
A step that the AMP grad scaler skips drops its measurement, as ``train.py`` then calls
``optimizer.zero_grad()``.
"""

from __future__ import annotations

import contextlib
import runpy
import sys
import warnings

import torch
import torch.nn.functional as F

from koala_hf.loops import koala_optimizer
from koala_hf.per_sample import per_sample_losses as classification_losses

FIRST_CHECK_RTOL = 1e-4


def per_sample_losses(criterion, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """Each sample's loss under one of timm's classification criteria, in float32, or ``None`` and why not.
    Class-index targets go through :func:`koala_hf.per_sample.per_sample_losses` (timm's
    ``LabelSmoothingCrossEntropy`` is torch's label-smoothed cross-entropy)."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    name = type(criterion).__name__
    if logits.dim() != 2:
        return None, f"the logits have shape {tuple(logits.shape)}, not [batch, classes]"
    if type(criterion) is SoftTargetCrossEntropy:
        if target.shape != logits.shape:
            return None, f"{name} got targets of shape {tuple(target.shape)}"
        return -(target.float() * F.log_softmax(logits.detach().float(), dim=-1)).sum(-1), ""
    if type(criterion) is LabelSmoothingCrossEntropy:
        smoothing = criterion.smoothing
    elif type(criterion) is torch.nn.CrossEntropyLoss:
        if criterion.weight is not None or criterion.reduction != "mean":
            return None, f"{name} has a class weight or reduction={criterion.reduction!r}"
        if bool((target == criterion.ignore_index).any()):
            return None, f"{name} ignores some targets (ignore_index={criterion.ignore_index})"
        smoothing = criterion.label_smoothing
    else:
        return None, f"the criterion {name} is not one whose per-sample losses koala_hf derives"
    if target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
        return None, f"{name} got targets of shape {tuple(target.shape)} and dtype {target.dtype}, not class indices"
    return classification_losses({"logits": logits}, target.long(), label_smoothing=smoothing), ""


class TimmLossFeed:
    """Observes the loss of every training forward of a timm task on the KOALA optimizers timm built
    (a forward hook: on one task, or on every module under the launcher)."""

    def __init__(self, optimizer=None):
        self.optimizers: list = []
        self.observed = 0
        self.per_sample: bool | None = None  # decided at the first observation; a fallback is said once
        if optimizer is not None:
            self.remember(optimizer)

    def remember(self, optimizer):
        inner = koala_optimizer(optimizer)
        if inner is not None:
            self.optimizers = [inner]  # train.py builds one optimizer; the last one built is stepped
        return optimizer

    def __call__(self, module, args, output):
        from timm.task import ClassificationTask, MultiLabelClassificationTask, TrainingTask

        if not (isinstance(module, TrainingTask) and module.training and torch.is_grad_enabled()):
            return
        if not self.optimizers or not isinstance(output, dict) or output.get("loss") is None:
            return
        loss, samples, why = output["loss"], None, ""
        classification = isinstance(module, ClassificationTask) and not isinstance(module, MultiLabelClassificationTask)
        if self.per_sample is not False:
            if classification and len(args) >= 2 and isinstance(output.get("output"), torch.Tensor):
                samples, why = per_sample_losses(module.criterion, output["output"], args[1])
            else:
                why = f"{type(module).__name__} is not a single-label ClassificationTask"
        if self.per_sample is None or (self.per_sample and samples is None):  # decided once; said if it changes
            self.per_sample = self._first_check(loss, samples, why)
        for optimizer in self.optimizers:
            optimizer.observe(loss, samples if self.per_sample else None)
        self.observed += 1

    @staticmethod
    def _first_check(loss: torch.Tensor, samples: torch.Tensor | None, why: str) -> bool:
        if samples is not None:
            mean, trained = samples.double().mean().item(), loss.detach().double().item()
            if abs(mean - trained) <= FIRST_CHECK_RTOL * max(abs(trained), 1e-12):
                return True
            why = f"the per-sample losses average {mean:.6g}, the loss trained on is {trained:.6g} (a custom criterion?)"
        warnings.warn(f"koala_hf: KOALA measures timm's mean loss per micro-batch, and its noise measurement falls "
                      f"back to loss**2 (E1): {why}.", stacklevel=3)
        return False


def feed_losses(task, optimizer) -> torch.utils.hooks.RemovableHandle:
    """From now on, every training forward of the timm ``task`` feeds its loss (per sample where
    :func:`per_sample_losses` derives it) to the KOALA ``optimizer``: the one line to add in ``train.py`` after
    ``optimizer = create_optimizer_v2(...)``. Returns the hook's handle (``.remove()`` stops it)."""
    from timm.task import TrainingTask

    if not isinstance(task, TrainingTask):
        raise TypeError(f"feed_losses takes timm's training task (a timm.task.TrainingTask), got {type(task).__name__}")
    if koala_optimizer(optimizer) is None:
        raise TypeError(f"{type(optimizer).__name__} is not a KOALA optimizer: create it with "
                        "create_optimizer_v2(..., opt='koalapp') after import koala_hf")
    return task.register_forward_hook(TimmLossFeed(optimizer))


@contextlib.contextmanager
def feed_timm_losses():
    """Inside it, timm tasks' training losses reach the KOALA optimizer ``timm.optim.create_optimizer_v2`` builds."""
    import timm.optim
    import timm.optim._optim_factory as factory

    feed = TimmLossFeed()
    create = factory.create_optimizer_v2

    def create_and_remember(*args, **kwargs):
        return feed.remember(create(*args, **kwargs))

    patched = [(factory, "create_optimizer_v2"), (timm.optim, "create_optimizer_v2")]
    originals = [(module, name, getattr(module, name)) for module, name in patched]
    for module, name in patched:
        setattr(module, name, create_and_remember)
    handle = torch.nn.modules.module.register_module_forward_hook(feed)
    try:
        yield feed
    finally:
        handle.remove()
        for module, name, original in originals:
            setattr(module, name, original)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].endswith(".py"):
        raise SystemExit("usage: python -m koala_hf.integrations.timm path/to/train.py [train.py's arguments], "
                         "e.g. --opt koalapp --lr 1.0 (timm's train.py is in the pytorch-image-models repository)")
    import koala_hf  # noqa: F401  (registers koalapp, koalappns, koalav, koalam in timm's factory)

    script, *arguments = argv
    sys.argv = [script, *arguments]
    with feed_timm_losses():
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
