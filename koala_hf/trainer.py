"""``KoalaTrainer``: a ``transformers.Trainer`` that feeds the loss into the KOALA step.

KOALA measures the loss (E1), so every optimizer step needs the mean loss and the per-sample losses of all
micro-batches that contributed gradient to it. ``KoalaTrainer`` records them as the Trainer computes its loss.

It combines with any Trainer subclass: ``class MyTrainer(KoalaTrainer, SomeTrainer)``, KoalaTrainer first
(koala_hf ships ``KoalaSFTTrainer`` for TRL and ``KoalaSeq2SeqTrainer``). Whatever the subclass computes, the
training forward's outputs are read where the model returns them (a forward hook, no extra forward pass):

* per-sample losses are derived from them (:meth:`KoalaTrainer.per_sample_losses`: causal LM, masked LM,
  token / sequence / image classification, regression, label smoothing, TRL's fused LM head), and checked once,
  on the first step, against the loss ``compute_loss`` returned, the one back-propagated. Their mean over the
  step is then exactly the Trainer's token-count normalised objective, across micro-batches and data-parallel
  ranks. A model that takes ``**kwargs`` but ignores ``num_items_in_batch`` (T5, BART) returns each
  micro-batch's own mean; its loss is then rescaled to the step's token normalisation the Trainer expects,
  so that gradient accumulation averages over all the step's tokens (a one-time notice says so);
* where they cannot be derived, or do not average to the loss returned (a custom or weighted loss, an
  auxiliary term, a loss type KoalaTrainer does not read, several forward passes), KOALA measures the loss
  the Trainer back-propagated, summed over the step's micro-batches, and the noise measurement falls back to
  ``L^2``; a one-time notice names the cause.

Which of these routes a run takes is held by one object, ``trainer.measurement``
(:class:`koala_hf.trainer_measurement.TrainerMeasurement`, whose module documents the routes and their states).

Without an optimizer, KoalaTrainer builds one: the variant named by :class:`KoalaTrainingArguments`, or,
given the Trainer's own ``TrainingArguments`` (replacing ``Trainer`` by ``KoalaTrainer`` in an existing
script), KOALA++, at its own default learning rate when ``learning_rate`` was left at the Trainer's default.
An ``optim`` set away from its default is a Trainer optimizer, which is then trained untouched: baselines
train the same way. One log line says which optimizer and learning rate it built.

Under data parallelism it sets ``average_tokens_across_devices`` (off by default before transformers 4.50),
so that the gradient is that of the step's token mean over all processes, which KOALA measures.

Everything else is the Trainer's: gradient accumulation, DDP, FSDP2, autocast, grad scaling (a step the
scaler skips drops its measurement), clipping, schedulers, evaluation (KOALA-M's posterior weights via
``optimizer.eval()``), checkpoints. KOALA's own signals (``optimizer.diagnostics()``) join the training logs.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import Trainer, TrainerCallback
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

from koala_hf.loops import koala_optimizer
from koala_hf.optim.base import KoalaOptimizer, constructor_defaults
from koala_hf.per_sample import per_sample_losses
from koala_hf.registry import optimizer_entry
from koala_hf.trainer_measurement import FALLBACK, Route, TrainerMeasurement, check_per_sample_losses
from koala_hf.training_args import KoalaTrainingArguments, trainer_optim_chosen
from koala_hf.unwrap import innermost_model

logger = logging.get_logger(__name__)

SHARDED_SETUP_ERROR = (
    "KOALA computes dot products over each whole parameter tensor (E11-E15). {setup} flattens parameters into "
    "one, which would silently change the algorithm, so it is not supported. Use FSDP2 (accelerate's "
    "fsdp_version: 2, recipes/accelerate_configs/fsdp.yaml), DDP (multi-GPU / multi-node configs) or one process."
)


def refuse_sharded_setups(*, fsdp: bool, deepspeed: bool) -> None:
    """Raise at start for setups that flatten parameters (never a silently different algorithm): FSDP1
    (``fsdp``) and DeepSpeed ZeRO. FSDP2 is supported (koala_hf.optim.sharding)."""
    if fsdp:
        raise ValueError(SHARDED_SETUP_ERROR.format(setup="FSDP1"))
    if deepspeed:
        raise ValueError(SHARDED_SETUP_ERROR.format(setup="DeepSpeed ZeRO"))


def is_causal_lm(model) -> bool:
    """A causal LM by its class hierarchy, inside any wrapper (DDP, FSDP, PEFT's ``PeftModelForCausalLM``)."""
    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return any(cls.__name__ in names for cls in type(innermost_model(model)).__mro__)


def declare_causal_lm_loss(model) -> None:
    """Give a causal LM without a ``loss_type`` (e.g. ``GPT2LMHeadModel(config)``, also inside a PEFT wrapper) the
    one its loss uses anyway.

    Its loss falls back to ``ForCausalLM`` with a warning, but the Trainer reads ``loss_type`` to learn that
    labels are shifted: without it, it divides the summed loss of ``T - 1`` predicted tokens by ``T`` labels per
    sequence, so the loss it trains on and reports is too low by ``(T - 1) / T``.
    """
    if model is None:
        return
    inner = innermost_model(model)
    if is_causal_lm(inner) and getattr(inner, "loss_type", "") is None:
        inner.loss_type = "ForCausalLM"


class KoalaTrainer(Trainer):
    """``transformers.Trainer`` for the KOALA optimizers (see the module docstring).

    Pass an optimizer (``optimizers=(KOALAPlusPlus(model.parameters(), lr=2e-3), None)``), or
    :class:`KoalaTrainingArguments` naming the variant, or nothing (KOALA++). A causal LM built without a
    ``loss_type`` gets ``ForCausalLM`` (:func:`declare_causal_lm_loss`), so the loss trained on and reported is
    the mean over the tokens predicted.
    """

    def __init__(self, *args, **kwargs):
        declare_causal_lm_loss(kwargs.get("model", args[0] if args else None))
        super().__init__(*args, **kwargs)
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            self.optimizer_cls_and_kwargs = self._koala_optimizer_to_build()
        if self._koala() is not None or self._builds_koala():
            fsdp_version = getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) if self.is_fsdp_enabled else 0
            refuse_sharded_setups(fsdp=fsdp_version == 1, deepspeed=self.is_deepspeed_enabled)
            if self.args.world_size > 1 and getattr(self.args, "average_tokens_across_devices", True) is False:
                # KOALA measures the step's token mean over every process (E1); so must the gradients be.
                self.args.average_tokens_across_devices = True
                logger.warning("KoalaTrainer: average_tokens_across_devices=True, so that the data-parallel gradient "
                               "is that of the step's token mean over all processes, which KOALA measures (it "
                               "would otherwise be the mean of each process's own token mean)")
        overridden = type(self).per_sample_losses is not KoalaTrainer.per_sample_losses
        self._loss_in_front = _overrides_before(type(self), "compute_loss", KoalaTrainer)  # a compute_loss before ours
        # How the loss reaches the step (koala_hf.trainer_measurement: its routes and their states).
        self.measurement = TrainerMeasurement(Route.UNCHECKED if overridden or self._loss_in_front is None
                                              else Route.BACKPROPAGATED)
        self.scaler_skipped_steps = 0
        self.add_callback(_FeedTheStep(self))

    def _koala_optimizer_to_build(self):
        """``(class, kwargs)`` of the optimizer KoalaTrainer builds when given none, or ``None`` for the Trainer's
        own ``optim`` (a baseline); logs which."""
        args = self.args
        if trainer_optim_chosen(args) and not getattr(args, "koala_optimizer_chosen", False):
            logger.warning(f"KoalaTrainer: optim={getattr(args.optim, 'value', args.optim)!r} is the Trainer's "
                           f"optimizer; training with it at lr {args.learning_rate:g}, not with KOALA "
                           "(unset optim to train KOALA++)")
            return None
        if isinstance(args, KoalaTrainingArguments):
            name, kwargs = args.koala_optimizer, args.koala_optimizer_kwargs()
        else:  # the Trainer's own arguments: KoalaTrainer swapped in for Trainer
            name = "koala++"
            entry = optimizer_entry(name)
            default_lr = type(args).__dataclass_fields__["learning_rate"].default
            lr = _variant_lr(entry.cls) if args.learning_rate == default_lr else args.learning_rate
            if args.learning_rate == default_lr:
                args.learning_rate = lr  # what the scheduler starts from and the logs report
            kwargs = {**entry.defaults, "lr": lr}
        cls = optimizer_entry(name).cls
        logger.warning(f"KoalaTrainer: training with {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
                       + ("" if isinstance(args, KoalaTrainingArguments) else
                          " (no optimizer given; the Trainer's default learning rate is AdamW's, KOALA++ takes its own)"))
        return cls, kwargs

    def _koala(self) -> KoalaOptimizer | None:
        """The KOALA optimizer this Trainer steps (inside Accelerate's wrapper), or ``None`` (none yet, or a
        baseline): the one place that decides whether KOALA is in use."""
        return koala_optimizer(self.optimizer) if self.optimizer is not None else None

    def _builds_koala(self) -> bool:
        """No optimizer yet, and the one the Trainer will build is a KOALA variant."""
        return (self.optimizer is None and self.optimizer_cls_and_kwargs is not None
                and issubclass(self.optimizer_cls_and_kwargs[0], KoalaOptimizer))

    # ------------------------------------------------------- measurement
    def per_sample_losses(self, model, outputs, labels, inputs) -> torch.Tensor | None:
        """The per-sample (or per-token) losses whose mean is this micro-batch's loss, or ``None``.

        Override for models whose loss :func:`koala_hf.per_sample_losses` does not know.
        """
        unwrapped = innermost_model(model)
        if "shift_labels" in inputs:
            labels, shift = inputs["shift_labels"], False
        else:
            # A causal LM by its class (as the Trainer's label smoothing decides) or by its loss_type; a model
            # built from a config may lack the loss_type the Trainer's own flag reads.
            shift = is_causal_lm(unwrapped) or bool(getattr(self, "_loss_shifts_labels", False))
        config = getattr(unwrapped, "config", None)
        smoothing = self.args.label_smoothing_factor if self.label_smoother is not None else 0.0
        return per_sample_losses(
            outputs,
            labels,
            shift_labels=shift,
            problem_type=getattr(config, "problem_type", None),
            label_smoothing=smoothing,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        measurement, optimizer = self.measurement, self._koala()
        if not (measurement.in_training_step and measurement.route.per_sample and optimizer is not None):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        labels = inputs.get("labels")  # the Trainer may pop it
        with _training_forwards(model) as forwards:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        losses = self.per_sample_losses(model, forwards[0], labels, inputs) if len(forwards) == 1 else None
        if losses is not None and losses.numel() == 0:
            losses = None
        if measurement.route is Route.UNCHECKED:
            route, notice = check_per_sample_losses(
                losses, loss, num_items_in_batch=num_items_in_batch,
                normalised=self.model_accepts_loss_kwargs or self.compute_loss_func is not None,
                num_processes=self.accelerator.num_processes, forwards=len(forwards), trainer=type(self).__name__,
                model=type(innermost_model(self.model)).__name__)
            measurement.settle(route, notice)
        if losses is not None and measurement.route.per_sample:
            measurement.observe_per_sample(optimizer, losses)
            if measurement.route is Route.RESCALED:  # the micro-batch's token sum over the step's token count
                count = num_items_in_batch.to(loss.dtype) if torch.is_tensor(num_items_in_batch) else float(num_items_in_batch)
                loss = loss * losses.numel() / count
        return (loss, *result[1:]) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        measurement = self.measurement
        measurement.begin_micro_batch()
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            measurement.in_training_step = False
        if self._koala() is not None and measurement.end_micro_batch(loss):
            front = self._loss_in_front
            cause = "none observed" if front is None else (
                f"{front.__name__}.compute_loss runs in front of KoalaTrainer's" + (
                    "" if front is type(self) else f"; put KoalaTrainer first: class {type(self).__name__}"
                    f"(KoalaTrainer, {front.__name__})"))
            measurement.notice(f"{type(self).__name__}: no per-sample losses for this model/loss ({cause}). {FALLBACK}")
        return loss

    # ------------------------------------------------------ logs and saving
    def _issue_warnings_after_load(self, load_result) -> None:
        """The Trainer's check, less tied weights: a checkpoint omits them by design (``lm_head`` = embeddings)."""
        config = getattr(self.model, "config", None)
        ties = getattr(config, "tie_word_embeddings", True) is not False
        tied = (getattr(self.model, "_tied_weights_keys", None) or {}) if ties else {}
        missing = [k for k in load_result.missing_keys if k not in tied]
        super()._issue_warnings_after_load(type(load_result)(missing, load_result.unexpected_keys))

    def log(self, logs: dict, *args, **kwargs) -> None:
        optimizer = self._koala()
        if optimizer is not None and "loss" in logs:
            logs = {**logs, **optimizer.diagnostics(), "koala/scaler_skipped_steps": float(self.scaler_skipped_steps)}
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Saves the posterior weights (KOALA-M's ``eval()`` mode); checkpoints keep the training state."""
        optimizer = self._koala()
        switch = not _internal_call and optimizer is not None and hasattr(optimizer, "eval")
        if switch:
            optimizer.eval()
        try:
            return super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            if switch:
                optimizer.train()


def _variant_lr(cls) -> float:
    return constructor_defaults(cls)["lr"]


def _overrides_before(cls, name: str, owner: type) -> type | None:
    """The first class in front of ``owner`` in ``cls``'s MRO that defines ``name`` (an override), or ``None``."""
    for klass in cls.__mro__:
        if klass is owner:
            return None
        if name in klass.__dict__:
            return klass
    return None


@contextlib.contextmanager
def _training_forwards(model):
    """The outputs of every forward pass of ``model`` run with gradients inside the block (forward hook: the
    outputs as the model returned them, however a Trainer subclass then computes its loss)."""
    from accelerate.utils import extract_model_from_parallel

    module = extract_model_from_parallel(model)
    captured: list = []

    def record(_module, _args, _kwargs, output):
        if torch.is_grad_enabled():
            captured.append(output)

    handle = module.register_forward_hook(record, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


class _FeedTheStep(TrainerCallback):
    """Around each optimizer step: observe a back-propagated measurement; drop one a grad scaler skipped."""

    def __init__(self, trainer: KoalaTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        optimizer = self.trainer._koala()
        if optimizer is not None:
            # Sum the measurement over exactly the processes whose gradients DDP averages: none when the
            # Trainer runs each process on its own (e.g. a process group it does not use).
            optimizer.measurement.process_group = None if args.world_size > 1 else False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        optimizer = self.trainer._koala()
        if optimizer is not None:
            self.trainer.measurement.feed(optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        optimizer = trainer._koala()
        if optimizer is None:
            return
        if trainer.accelerator.optimizer_step_was_skipped:
            trainer.scaler_skipped_steps += 1
        optimizer.measurement.discard()  # the Trainer zeroes gradients through the model, not the optimizer
