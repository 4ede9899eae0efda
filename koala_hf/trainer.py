"""``KoalaTrainer``: a ``transformers.Trainer`` that feeds the loss into the KOALA step.

KOALA measures the loss (E1), so every optimizer step needs the mean loss and
the per-sample losses of all micro-batches that contributed gradient to it.
``KoalaTrainer`` records them as the Trainer computes its loss:

* models whose loss it knows (causal LM, masked LM, token / sequence / image
  classification, regression; label smoothing included): per micro-batch, the
  per-token or per-example losses from :meth:`KoalaTrainer.per_sample_losses`.
  Their mean over the whole step is exactly the Trainer's token-count
  normalised objective, across micro-batches and data-parallel ranks;
* a custom ``compute_loss`` or ``compute_loss_func`` (unless
  ``per_sample_losses`` is overridden too), a model it cannot read, or a model
  whose own loss is not what the per-sample losses average to (checked once, on
  the first step: a custom L1 or class-weighted loss, an auxiliary term): the
  loss the Trainer back-propagated, summed over the step's micro-batches; the
  noise measurement then falls back to ``L^2`` (a one-time notice says so).

Everything else is the Trainer's: gradient accumulation, DDP, autocast, grad
scaling (a step the scaler skips drops its measurement), clipping, schedulers,
evaluation (KOALA-M's posterior weights via ``optimizer.eval()``), checkpoints.
KOALA's own signals (``optimizer.diagnostics()``) join the training logs.
Non-KOALA optimizers pass through untouched, so baselines train the same way.
"""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

from koala_hf.loops import koala_optimizer
from koala_hf.per_sample import per_sample_losses
from koala_hf.optim.base import KoalaOptimizer
from koala_hf.registry import optimizer_entry
from koala_hf.training_args import KoalaTrainingArguments

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
    """A causal LM by its class hierarchy (so also under wrappers that subclass it, e.g. FSDP's ``FSDP<Name>``)."""
    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return any(cls.__name__ in names for cls in type(model).__mro__)


def declare_causal_lm_loss(model) -> None:
    """Give a causal LM without a ``loss_type`` (e.g. ``GPT2LMHeadModel(config)``) the one its loss uses anyway.

    Its loss falls back to ``ForCausalLM`` with a warning, but the Trainer reads
    ``loss_type`` to learn that labels are shifted: without it, it divides the
    summed loss of ``T - 1`` predicted tokens by ``T`` labels per sequence, so
    the loss it trains on and reports is too low by ``(T - 1) / T``.
    """
    if model is not None and is_causal_lm(model) and getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"


class KoalaTrainer(Trainer):
    """``transformers.Trainer`` for the KOALA optimizers (see the module docstring).

    Pass an optimizer (``optimizers=(KOALAPlusPlus(model.parameters(), lr=2e-3), None)``)
    or :class:`KoalaTrainingArguments` naming the variant. A causal LM built
    without a ``loss_type`` gets ``ForCausalLM`` (:func:`declare_causal_lm_loss`),
    so the loss trained on and reported is the mean over the tokens predicted.
    """

    def __init__(self, *args, **kwargs):
        declare_causal_lm_loss(kwargs.get("model", args[0] if args else None))
        super().__init__(*args, **kwargs)
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            if not isinstance(self.args, KoalaTrainingArguments):
                raise TypeError(
                    "KoalaTrainer needs an optimizer: pass optimizers=(KOALAPlusPlus(model.parameters(), lr=...), None) "
                    "or use koala_hf.KoalaTrainingArguments(koala_optimizer='koala++', ...)"
                )
            entry = optimizer_entry(self.args.koala_optimizer)
            self.optimizer_cls_and_kwargs = (entry.cls, self.args.koala_optimizer_kwargs())
        if self._uses_koala():
            fsdp_version = getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) if self.is_fsdp_enabled else 0
            refuse_sharded_setups(fsdp=fsdp_version == 1, deepspeed=self.is_deepspeed_enabled)
        overridden = type(self).per_sample_losses is not KoalaTrainer.per_sample_losses
        custom_loss = type(self).compute_loss is not KoalaTrainer.compute_loss or self.compute_loss_func is not None
        self._derive_per_sample = overridden or not custom_loss
        self._in_training_step = self._observed_micro_batch = False
        self._backpropagated = None  # fallback measurement: the step's summed back-propagated loss
        self._fallback_noticed = False
        self._measurement_checked = False
        self.scaler_skipped_steps = 0
        self.add_callback(_FeedTheStep(self))

    def _uses_koala(self) -> bool:
        if self.optimizer is not None:
            return koala_optimizer(self.optimizer) is not None
        return self.optimizer_cls_and_kwargs is not None and issubclass(self.optimizer_cls_and_kwargs[0], KoalaOptimizer)

    # ------------------------------------------------------- measurement
    def per_sample_losses(self, model, outputs, labels, inputs) -> torch.Tensor | None:
        """The per-sample (or per-token) losses whose mean is this micro-batch's loss, or ``None``.

        Override for models whose loss :func:`koala_hf.per_sample_losses` does not know.
        """
        unwrapped = self.accelerator.unwrap_model(model)
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
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        losses = self.per_sample_losses(model, outputs, labels, inputs)
        if losses is not None and losses.numel() > 0 and not self._measurement_checked:
            self._measurement_checked = True
            if not self._matches_the_models_loss(outputs, losses, num_items_in_batch):
                self._derive_per_sample, losses = False, None  # measure what is back-propagated from now on
        if losses is not None and losses.numel() > 0:
            optimizer.observe(losses.mean(), losses)
            self._observed_micro_batch = True
        return (loss, outputs) if return_outputs else loss

    def _matches_the_models_loss(self, outputs, losses: torch.Tensor, num_items_in_batch) -> bool:
        """Whether the derived per-sample losses average to the loss the model returned (first step only).

        A custom model whose loss is not the plain cross-entropy or squared error of its logits (an L1 loss,
        class weights, an auxiliary term) would otherwise be filtered on a wrong measurement. The one host
        read of the whole run happens here.
        """
        reported = outputs.get("loss") if isinstance(outputs, dict) else None
        if reported is None:  # the Trainer computed the loss (label smoothing) the way per_sample_losses does
            return True
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            derived = losses.sum() / num_items_in_batch  # the model divides its sum by the step's token count
        else:
            derived = losses.mean()
        derived, reported = torch.stack([derived.float(), reported.detach().float().to(derived.device)]).tolist()
        # With average_tokens_across_devices the count is every process's, and the Trainer multiplies the
        # model's loss (in place) by the number of processes, so that averaging the gradients undoes it.
        scales = {1.0, float(self.accelerator.num_processes)}
        if any(abs(derived * scale - reported) <= 1e-3 * abs(reported) + 1e-6 for scale in scales):
            return True
        self._fallback_noticed = True
        logger.warning(
            f"KoalaTrainer: the per-sample losses derived from the logits average {derived:.6g}, but the model's "
            f"loss is {reported:.6g} (a custom loss?). KOALA measures the back-propagated loss instead and its noise "
            "measurement falls back to loss**2 (E1). Override KoalaTrainer.per_sample_losses to provide the right ones."
        )
        return False

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._in_training_step, self._observed_micro_batch = True, False
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._in_training_step = False
        if self._uses_koala() and not self._observed_micro_batch:
            self._notice_fallback()
            # What was back-propagated for this micro-batch, already divided for accumulation.
            contribution = loss.detach().float()
            self._backpropagated = contribution if self._backpropagated is None else self._backpropagated + contribution
        return loss

    def _notice_fallback(self) -> None:
        if not self._fallback_noticed:
            self._fallback_noticed = True
            logger.warning(
                "KoalaTrainer: no per-sample losses for this model/loss; KOALA measures the mean loss only and its "
                "noise measurement falls back to loss**2 (E1). Override KoalaTrainer.per_sample_losses to provide them."
            )

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
