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
from koala_hf.training_args import KoalaTrainingArguments, trainer_optim_chosen
from koala_hf.unwrap import innermost_model

logger = logging.get_logger(__name__)

SHARDED_SETUP_ERROR = (
    "KOALA computes dot products over each whole parameter tensor (E11-E15). {setup} flattens parameters into "
    "one, which would silently change the algorithm, so it is not supported. Use FSDP2 (accelerate's "
    "fsdp_version: 2, recipes/accelerate_configs/fsdp.yaml), DDP (multi-GPU / multi-node configs) or one process."
)
FALLBACK = ("KOALA measures the loss the Trainer back-propagated instead (exact), and its noise measurement falls "
            "back to loss**2 (E1). Override KoalaTrainer.per_sample_losses to provide per-sample losses.")


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
        if self._uses_koala():
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
        self._derive_per_sample = overridden or self._loss_in_front is None
        self._in_training_step = self._observed_micro_batch = False
        self._backpropagated = None  # fallback measurement: the step's summed back-propagated loss
        self._fallback_noticed = False
        self._measurement_checked = False
        self._renormalise = False  # the model ignores num_items_in_batch: its loss is rescaled (see the module)
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

    def _uses_koala(self) -> bool:
        if self.optimizer is not None:
            return koala_optimizer(self.optimizer) is not None
        return self.optimizer_cls_and_kwargs is not None and issubclass(self.optimizer_cls_and_kwargs[0], KoalaOptimizer)

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
        optimizer = koala_optimizer(self.optimizer) if self.optimizer is not None else None
        if not (self._in_training_step and self._derive_per_sample and optimizer is not None):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        labels = inputs.get("labels")  # the Trainer may pop it
        with _training_forwards(model) as forwards:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        losses = self.per_sample_losses(model, forwards[0], labels, inputs) if len(forwards) == 1 else None
        if losses is not None and losses.numel() == 0:
            losses = None
        if not self._measurement_checked:
            self._measurement_checked = True
            losses = self._check_measurement(loss, losses, num_items_in_batch, len(forwards))
            if losses is None:
                self._derive_per_sample = False  # measure what is back-propagated from now on
        if losses is not None:
            optimizer.observe(losses.mean(), losses)
            self._observed_micro_batch = True
            if self._renormalise:  # the micro-batch's token sum over the step's token count, in the loss's dtype
                count = num_items_in_batch.to(loss.dtype) if torch.is_tensor(num_items_in_batch) else float(num_items_in_batch)
                loss = loss * losses.numel() / count
        return (loss, *result[1:]) if return_outputs else loss

    def _check_measurement(self, loss, losses, num_items_in_batch, forwards: int):
        """The per-sample losses if they average to the loss ``compute_loss`` returned, else ``None`` with a
        notice naming why (first step only; the one host read of the run)."""
        name = type(self).__name__
        if losses is None:
            cause = (f"{forwards} forward passes computed this loss" if forwards != 1 else
                     "the training forward's outputs give none (no logits, log-probabilities or labels)")
            self._notice(f"{name}: no per-sample losses: {cause}. {FALLBACK}")
            return None
        # With average_tokens_across_devices the token count is every process's, and the Trainer multiplies
        # the loss (in place) by the number of processes, so that averaging the gradients undoes it.
        scales = {1.0, float(self.accelerator.num_processes)}
        normalised = num_items_in_batch is not None and (self.model_accepts_loss_kwargs or self.compute_loss_func is not None)
        candidates = [losses.mean().float()] + ([losses.sum().float() / num_items_in_batch] if normalised else [])
        values = torch.stack([c.to(loss.device) for c in candidates] + [loss.detach().float()]).tolist()
        *derived, reported = values

        def matches(value: float) -> bool:
            return any(abs(value * scale - reported) <= 1e-3 * abs(reported) + 1e-6 for scale in scales)

        if normalised and matches(derived[1]):
            return losses
        if matches(derived[0]):
            if normalised and abs(derived[0] - derived[1]) > 1e-3 * abs(derived[0]) + 1e-6:
                model_name = type(innermost_model(self.model)).__name__
                self._renormalise = True
                self._notice(f"{name}: {model_name} takes **kwargs but ignores num_items_in_batch: its loss is each "
                             "micro-batch's own token mean, and the Trainer, expecting a loss normalised by the "
                             "step's token count, does not divide it by the accumulation steps. KoalaTrainer "
                             "rescales it to the step's token normalisation, so that the gradient is that of the "
                             "step's token mean, which KOALA measures per token.")
            return losses
        expected = derived[1] if normalised else derived[0]
        self._notice(f"{name}: the loss compute_loss returned ({reported:.6g}) is not the mean of the per-sample "
                     f"losses derived from the model's outputs ({expected:.6g}): a custom or weighted loss, an "
                     "auxiliary term, or a loss type KoalaTrainer does not read (for TRL's, use "
                     f"koala_hf.KoalaSFTTrainer). {FALLBACK}")
        return None

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._in_training_step, self._observed_micro_batch = True, False
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._in_training_step = False
        if self._uses_koala() and not self._observed_micro_batch:
            if not self._fallback_noticed:
                front = self._loss_in_front
                cause = "none observed" if front is None else (
                    f"{front.__name__}.compute_loss runs in front of KoalaTrainer's" + (
                        "" if front is type(self) else f"; put KoalaTrainer first: class {type(self).__name__}"
                        f"(KoalaTrainer, {front.__name__})"))
                self._notice(f"{type(self).__name__}: no per-sample losses for this model/loss ({cause}). {FALLBACK}")
            # What was back-propagated for this micro-batch, already divided for accumulation.
            contribution = loss.detach().float()
            self._backpropagated = contribution if self._backpropagated is None else self._backpropagated + contribution
        return loss

    def _notice(self, message: str) -> None:
        self._fallback_noticed = True
        logger.warning(message)

    # ------------------------------------------------------ logs and saving
    def _issue_warnings_after_load(self, load_result) -> None:
        """The Trainer's check, less tied weights: a checkpoint omits them by design (``lm_head`` = embeddings)."""
        config = getattr(self.model, "config", None)
        ties = getattr(config, "tie_word_embeddings", True) is not False
        tied = (getattr(self.model, "_tied_weights_keys", None) or {}) if ties else {}
        missing = [k for k in load_result.missing_keys if k not in tied]
        super()._issue_warnings_after_load(type(load_result)(missing, load_result.unexpected_keys))

    def log(self, logs: dict, *args, **kwargs) -> None:
        optimizer = koala_optimizer(self.optimizer) if self.optimizer is not None else None
        if optimizer is not None and "loss" in logs:
            logs = {**logs, **optimizer.diagnostics(), "koala/scaler_skipped_steps": float(self.scaler_skipped_steps)}
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Saves the posterior weights (KOALA-M's ``eval()`` mode); checkpoints keep the training state."""
        optimizer = koala_optimizer(self.optimizer) if self.optimizer is not None else None
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
    """Around each optimizer step: observe a fallback measurement; drop one a grad scaler skipped."""

    def __init__(self, trainer: KoalaTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        optimizer = koala_optimizer(self.trainer.optimizer)
        if optimizer is not None:
            # Sum the measurement over exactly the processes whose gradients DDP averages: none when the
            # Trainer runs each process on its own (e.g. a process group it does not use).
            optimizer.measurement.process_group = None if args.world_size > 1 else False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer._backpropagated is not None:
            optimizer = koala_optimizer(trainer.optimizer)
            if optimizer is not None:
                optimizer.observe(trainer._backpropagated)
            trainer._backpropagated = None

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        optimizer = koala_optimizer(trainer.optimizer)
        if optimizer is None:
            return
        if trainer.accelerator.optimizer_step_was_skipped:
            trainer.scaler_skipped_steps += 1
        optimizer.measurement.discard()  # the Trainer zeroes gradients through the model, not the optimizer
