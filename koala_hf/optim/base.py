"""What every KOALA optimizer shares: the loss protocol, the step skeleton (E2), the filter-wide state.

KOALA measures the loss, not only the gradient, so a step needs the loss of the batch it consumes:
``observe(loss, per_sample_losses)`` after the backward pass (several times under gradient accumulation),
then ``step()``; or ``step(closure)`` with a closure returning the loss, as in torch. ``zero_grad()`` discards
a measurement no step consumed.

A step consumes the measurement (E1) and hands it, with the filter-wide state, to the variant's ``_update``
(koala_hf.optim.step_inputs.StepInputs: each group's noise estimate ``R_k``, E2, computed there on first use,
or by a fused scalar kernel), which runs over the per-group records of koala_hf.optim.group_step on the
backend koala_hf.optim.dispatch chooses. A non-finite or negative loss
(KOALA measures against a target of 0, E1) skips the step: nothing moves, and the skip is counted.

Hyperparameters are always read from the parameter groups, so ``load_state_dict`` (whose groups win, as in
torch) restores everything a step uses. Those of the filter as a whole (``shared_hyperparameters``, e.g.
KOALA-V's ``q``) must be equal in every group and are read from the first.

Checkpoint layout and migration: koala_hf.optim.checkpoint. Like every torch optimizer, a KOALA optimizer
pickles and deep-copies with its pending measurement (and KOALA-M its train/eval mode), and loads state dicts
whose groups lack a hyperparameter added later (filled with this optimizer's value).
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
import weakref
from typing import Callable

import torch

from koala_hf.measurement import LossMeasurement
from koala_hf.optim import checkpoint, dispatch, triton_step
from koala_hf.optim.advice import Reading, TrainingAdvisor
from koala_hf.optim.checkpoint import FILTER_STATE
from koala_hf.optim.gather_cache import GatherCache
from koala_hf.optim.layers import StepWorkspace
from koala_hf.optim.step_inputs import StepInputs
from koala_hf.optim.sharding import check_parameter
from koala_hf.optim.validation import check_noise, check_range


@functools.cache
def constructor_defaults(cls: type) -> dict:
    """An optimizer class's constructor arguments, ``params`` aside, with their defaults (``inspect.Parameter.empty``
    where there is none): the one place a signature is read. For a KOALA variant, the constructor of the class
    that declares its state keys, so that a subclass with ``__init__(*args, **kwargs)`` has them too."""
    owner = next((c for c in cls.__mro__ if "layer_state_keys" in c.__dict__), cls)
    parameters = inspect.signature(owner.__init__).parameters
    return {name: p.default for name, p in parameters.items() if name not in ("self", "params")
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


def missing_loss_message(optimizer: str) -> str:
    """What a step without a measurement says: the ways to give the loss, timm's own where timm is loaded."""
    message = (f"{optimizer}.step() needs the loss: KOALA measures the loss, not only the gradient. "
               "Call optimizer.observe(loss) (optionally with per_sample_losses=) after loss.backward() "
               "(koala_hf.observe(optimizer, loss) where accelerator.prepare has wrapped the optimizer), "
               "pass a closure that returns the loss to step(), or train with koala_hf.KoalaTrainer.")
    if "timm" in sys.modules:
        message += (" In timm's train.py, add koala_hf.integrations.timm.feed_losses(task, optimizer) after it "
                    "creates the optimizer (with import koala_hf.integrations.timm at the top), or run it unchanged "
                    "as python -m koala_hf.integrations.timm train.py ...")
    return message


class KoalaOptimizer(torch.optim.Optimizer):
    """Base class of the KOALA optimizers; each variant implements ``_update`` and declares:

    * ``layer_state_keys``: its per-parameter state; ``layer_scalar_keys``: those that are per-layer scalars,
      kept in float32 or wider whatever the parameter's dtype;
    * ``filter_state_keys``: its own filter-wide state (beside ``R`` and the counters);
    * ``identifying_hyperparameters``: keys its parameter groups have (to recognise its state dicts);
    * ``shared_hyperparameters``: hyperparameters of the filter as a whole, equal in every group.
    """

    layer_state_keys: tuple[str, ...] = ()
    layer_scalar_keys: tuple[str, ...] = ()
    retired_layer_state_keys: tuple[str, ...] = ()  # per-parameter state an older version saved: dropped at a load
    filter_state_keys: tuple[str, ...] = ()
    identifying_hyperparameters: tuple[str, ...] = ()
    shared_hyperparameters: tuple[str, ...] = ()
    # Attributes that pickling and deepcopy carry besides torch's defaults, state and param_groups.
    _carried_attributes: tuple[str, ...] = ("_measurement",)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        checkpoint.register_variant(cls)

    def __init__(self, params, defaults: dict) -> None:
        self._measurement = LossMeasurement()
        self._warned_negative_loss = False
        self._create_caches()
        super().__init__(params, defaults)
        self._install_checkpoint_hooks()

    def _create_caches(self) -> None:
        """What the optimizer keeps between steps that is not state (never saved; rebuilt after a pickle)."""
        self._applied_lrs: list = []  # the learning rates the last step applied, per group (applied_lr)
        self._checked_parameters: dict[int, weakref.ref] = {}  # id -> the parameter check_parameter accepted, held weakly
        self._triton_chunk_plans: dict = {}  # the Triton kernels' chunk plans by the layers' sizes (triton_step.ChunkPlan)
        self._triton_batches = triton_step.BatchCache()  # the last step's batch per layout, reused while addresses hold
        self._gathered = GatherCache()  # the last step's per-group records, reused while their tensors are unchanged
        self._workspaces: dict = {}  # the CPU foreach paths' reused temporaries by name (StepWorkspace)
        self._advisor = TrainingAdvisor(type(self).__name__)  # what diagnostics() readings say, said once

    def _install_checkpoint_hooks(self) -> None:
        """The save hook (koala_hf.optim.checkpoint.pack); torch's hooks do not survive pickling, so again after it."""
        self.register_state_dict_post_hook(checkpoint.pack)
        self._checkpoint_hooks = True

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({name: self.__dict__[name] for name in self._carried_attributes if name in self.__dict__})
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # also what load_state_dict installs the loaded groups with
        self.__dict__.setdefault("_measurement", LossMeasurement())
        self.__dict__.setdefault("_warned_negative_loss", False)
        if "_triton_chunk_plans" not in self.__dict__:  # unpickled: the caches are not carried
            self._create_caches()
        self._triton_batches.clear()  # a loaded state dict brings new state tensors
        self._gathered.clear()
        for group in self.param_groups:  # groups saved before a hyperparameter existed get this optimizer's value
            for key in self.hyperparameter_names():
                group.setdefault(key, self.defaults[key])
        if not self.__dict__.get("_checkpoint_hooks"):  # unpickled: the hooks are gone
            self._install_checkpoint_hooks()

    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        """The variant's hyperparameters: its constructor's arguments, ``params`` aside."""
        return tuple(constructor_defaults(cls))

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state as torch does (the saved groups win); see koala_hf.optim.checkpoint for what KOALA adds.

        The ``load_state_dict`` pre-hooks run first and what they return is loaded. The state of another
        KOALA variant or another optimizer is refused, naming both.
        """
        loading = checkpoint.Loading(self)
        prepare = self.register_load_state_dict_pre_hook(loading.prepare)  # after the user's pre-hooks
        restore = self.register_load_state_dict_post_hook(loading.restore, prepend=True)  # before the user's
        try:
            super().load_state_dict(state_dict)
        finally:
            prepare.remove()
            restore.remove()

    # ----------------------------------------------------------------- groups
    def check_group(self, group: dict) -> None:
        """Validate one parameter group's hyperparameters (variants add their own)."""
        check_range("lr", group["lr"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_noise(group)
        dispatch.check_options(group, type(self).__name__)
        if group["fused"]:
            dispatch.check_fused_devices(group["fused"], {p.device.type for p in group["params"]}, type(self).__name__)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError(f"{type(self).__name__} does not support complex parameters; use torch.view_as_real")
        self.check_new_parameters(group["params"])
        self.check_group(group)
        first = self.param_groups[0]
        for name in self.shared_hyperparameters:
            if group[name] != first[name]:
                raise ValueError(
                    f"{type(self).__name__}'s {name} belongs to the whole filter and must be equal in every "
                    f"parameter group (got {first[name]!r} and {group[name]!r}); set it once in the constructor"
                )
        if FILTER_STATE in self.state:  # a group added after steps starts from R_0 = 1 (E2)
            checkpoint.extend_noise_estimates(self.state[FILTER_STATE], len(self.param_groups))

    def check_new_parameters(self, params) -> None:
        """:func:`~koala_hf.optim.sharding.check_parameter` once for each parameter this optimizer has not seen:
        at ``add_param_group``, and at a step for parameters swapped in since (accelerate's FSDP2 preparation
        replaces them by their shards)."""
        for p in params:
            seen = self._checked_parameters.get(id(p))  # a plain dict: this runs for every parameter at every step
            if seen is None or seen() is not p:  # new, or a new object where a freed one was
                check_parameter(p, type(self).__name__)
                self._checked_parameters[id(p)] = weakref.ref(p)

    def shared(self, name: str):
        """A hyperparameter of the filter as a whole (``shared_hyperparameters``), read from the first group."""
        return self.param_groups[0][name]

    # ----------------------------------------------------------- diagnostics
    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """KOALA's own signals for logs: noise estimate ``R``, skipped steps, and the variant's, all of the last
        step (a learning rate in them is the one that step applied, :meth:`applied_lr`). Each reading also goes
        to the optimizer's :class:`~koala_hf.optim.advice.TrainingAdvisor`, which logs once what a sign of a
        poor setting calls for.

        Reads values back from the device: call it when logging, not every step.
        """
        state = self.state.get(FILTER_STATE)
        if state is None:
            return {}
        signals = {
            "koala/R": state["R"].mean().item(),
            "koala/measured_loss": state["loss"].item(),
            "koala/skipped_steps": float(state["skipped_steps"].item()),
            "koala/negative_loss_steps": float(state["negative_loss_steps"].item()),
        }
        if signals["koala/negative_loss_steps"] > 0 and not self._warned_negative_loss:
            self._warn_negative_loss()
        signals.update({key: value.item() for key, value in self._signals(state).items()})
        skipped = int(signals["koala/skipped_steps"] - signals["koala/negative_loss_steps"])
        self._advisor.read(Reading(signals, steps=int(state["step"].item()) + int(signals["koala/skipped_steps"]),
                                   skipped=skipped, sigma_plus_q=self._sgd_step_scale()))
        return signals

    def _sgd_step_scale(self) -> float | None:
        """The factor that turns ``lr * L / R`` into the step a noise-dominated KOALA takes (advice), if any."""
        return None

    def _signals(self, state: dict) -> dict[str, torch.Tensor]:
        return {}

    def applied_lr(self, index: int):
        """The learning rate that the last step applied to group ``index`` (E4): the group's ``lr`` at that step,
        not the one a scheduler has set since (nor before any step, or after a load: then the group's own)."""
        applied = self._applied_lrs
        return applied[index] if index < len(applied) else self.param_groups[index]["lr"]

    # ----------------------------------------------------------- measurement
    def observe(self, loss, per_sample_losses: torch.Tensor | None = None) -> None:
        """Record the measurement for the next ``step()`` (E1). See :class:`LossMeasurement`."""
        on_host = not isinstance(loss, torch.Tensor) or (loss.device.type == "cpu" and loss.numel() == 1)
        if on_host and not self._warned_negative_loss and float(loss.detach() if isinstance(loss, torch.Tensor) else loss) < 0:  # free on the CPU; never a device sync
            self._warn_negative_loss()
        self._measurement.observe(loss, per_sample_losses, device=self._device())

    def _warn_negative_loss(self) -> None:
        self._warned_negative_loss = True
        warnings.warn(
            f"{type(self).__name__} was given a negative loss. KOALA measures the loss against a target of 0 (E1), "
            "so a step with a negative loss is skipped and counted in state['koala']['negative_loss_steps']. "
            "Shift the loss so that it cannot be negative (e.g. subtract its lower bound).",
            stacklevel=3,
        )

    @property
    def measurement(self) -> LossMeasurement:
        return self._measurement

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and discard a measurement that no step consumed."""
        super().zero_grad(set_to_none=set_to_none)
        self._measurement.discard()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Take one Kalman step with the recorded measurement.

        With a closure, the closure re-evaluates the model and returns the loss; if it did not call
        ``observe`` itself, its return value is observed (as the batch mean loss).
        """
        loss = None
        if closure is not None:
            observed = self._measurement.observations
            with torch.enable_grad():
                loss = closure()
            if self._measurement.observations == observed:
                if loss is None:
                    raise RuntimeError("the closure passed to step() returned None; it must return the loss")
                self.observe(loss)
        if not self._measurement.pending:
            if self._is_state_initialisation():
                self._create_state()
                return loss
            raise RuntimeError(missing_loss_message(type(self).__name__))
        inputs = StepInputs(self._measurement.consume_stats(), self._filter_state(), self.param_groups)
        ok = self._update(inputs)  # the step taken: narrowed where the sums are not finite
        # The learning rates this step applied, for diagnostics() read after a scheduler has moved them on.
        self._applied_lrs = [group["lr"].clone() if isinstance(group["lr"], torch.Tensor) else group["lr"]
                             for group in self.param_groups]
        inputs.record(ok)  # R where taken, the counters, the loss (unless a fused scalar step wrote them)
        return loss

    def _update(self, inputs: StepInputs) -> torch.Tensor:
        """Apply one step from ``inputs.measured`` (E1, E2: the loss, each group's ``R_k``, ``ok``), or from its raw
        sums in a fused scalar step. Return the device flag "step taken"."""
        raise NotImplementedError

    def _is_state_initialisation(self) -> bool:
        """A first ``step()`` without a loss at learning rate 0: how ``torch.distributed.checkpoint`` creates an
        optimizer's state before saving or loading it (FSDP2 checkpoints). It needs no measurement."""
        return not self.state and all(float(group["lr"]) == 0 for group in self.param_groups)

    def _create_state(self) -> None:
        """Create the filter-wide state and the state of every parameter with a gradient, without a step."""
        self._filter_state()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._layer_state(p)

    # ----------------------------------------------------------------- state
    def _layer_state(self, p: torch.Tensor) -> dict:
        """The state of one parameter, created on first use (variants that keep some override this)."""
        return self.state[p]

    def _filter_state(self) -> dict:
        """The filter-wide state, created at the first step: counters, ``R`` per group (``R_0 = 1``, E2), and the
        variant's (``_init_filter_state``). Later calls only look it up."""
        state = self.state.get(FILTER_STATE)
        if state is None:
            options = {"device": self._device(), "dtype": self._scalar_dtype()}
            counter = {"dtype": torch.int64, "device": options["device"]}
            state = {
                "step": torch.zeros((), **counter),
                "skipped_steps": torch.zeros((), **counter),
                "negative_loss_steps": torch.zeros((), **counter),
                "R": torch.ones(len(self.param_groups), **options),
                "loss": torch.full((), float("nan"), **options),
            }
            state.update(self._init_filter_state(options))
            self.state[FILTER_STATE] = state
        return state

    def _init_filter_state(self, options: dict) -> dict:
        """The variant's own filter-wide state (``filter_state_keys``), at the first step."""
        return {}

    def _workspace(self, name: str) -> StepWorkspace:
        """The foreach paths' reused temporaries ``name`` (``"H"``, KOALA-M's ``"d"``) on the CPU; not state:
        never saved, rebuilt after a load."""
        if name not in self._workspaces:
            self._workspaces[name] = StepWorkspace()
        return self._workspaces[name]

    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    def _scalar_dtype(self) -> torch.dtype:
        """float64 when any parameter is float64, else float32 (reductions never below float32)."""
        wide = any(p.dtype == torch.float64 for g in self.param_groups for p in g["params"])
        return torch.float64 if wide else torch.float32
