"""timm's ``train.py`` with the KOALA optimizers, unchanged: this launcher feeds each batch's loss to the step.

    python -m koala_hf.integrations.timm path/to/train.py --opt koalapp --lr 1.0 ...   # train.py's own arguments

timm's ``train.py`` computes each batch's loss in a training task (``result = task(input, target)``, a
``timm.task.TrainingTask``) and steps the optimizer ``timm.optim.create_optimizer_v2`` built, without ever
handing that loss to the optimizer; a KOALA step needs it (E1). :func:`feed_timm_losses` adds two things,
and the launcher runs ``train.py`` inside it:

* the KOALA optimizer ``create_optimizer_v2`` builds is remembered (``--opt koalapp``, ``koalappns``,
  ``koalav``, ``koalam`` after ``import koala_hf``);
* every training forward of a timm task (in train mode, with gradients) observes ``result["loss"]``, the
  micro-batch's mean loss before train.py divides it for gradient accumulation, on that optimizer.

timm's criteria return the batch mean only, so the noise measurement falls back to ``loss**2`` (E1); this is
said once. A step that the AMP grad scaler skips drops its measurement, as ``train.py`` then calls
``optimizer.zero_grad()``. Distillation tasks' losses are measured as trained, their distillation term
included.
"""

from __future__ import annotations

import contextlib
import runpy
import sys
import warnings

import torch

from koala_hf.loops import koala_optimizer

NOTICE = ("koala_hf: timm's criterion gives the batch's mean loss only, so KOALA's noise measurement falls back "
          "to loss**2 (E1).")


class TimmLossFeed:
    """Observes the loss of every training forward of a timm task on the KOALA optimizers timm built."""

    def __init__(self):
        self.optimizers: list = []
        self.observed = 0

    def remember(self, optimizer):
        inner = koala_optimizer(optimizer)
        if inner is not None:
            self.optimizers = [inner]  # train.py builds one optimizer; the last one built is stepped
        return optimizer

    def __call__(self, module, args, output):
        from timm.task import TrainingTask

        if not (isinstance(module, TrainingTask) and module.training and torch.is_grad_enabled()):
            return
        if not self.optimizers or not isinstance(output, dict) or output.get("loss") is None:
            return
        if self.observed == 0:
            warnings.warn(NOTICE, stacklevel=2)
        for optimizer in self.optimizers:
            optimizer.observe(output["loss"])
        self.observed += 1


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
