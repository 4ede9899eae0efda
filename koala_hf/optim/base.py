"""What every KOALA optimizer shares: the loss protocol, noise estimate, skips, checkpoints.

KOALA measures the loss, not only the gradient, so a step needs the loss of the
batch it consumes: ``observe(loss, per_sample_losses)`` after the backward pass
(several times under gradient accumulation), then ``step()``; or
``step(closure)`` with a closure returning the loss, as in torch. ``zero_grad()``
discards a measurement no step consumed.

Scalar state that belongs to the whole filter (the noise estimate ``R`` of each
parameter group (E2), step and skip counters, KOALA-V's ``P``, KOALA-M's ``P``
and ``qw_avg``) lives in ``self.state["koala"]``. ``state_dict()`` carries it in
the first parameter group's ``"koala"`` entry, so that every key of its
``"state"`` is a parameter, as ``torch.distributed.checkpoint`` (FSDP2
checkpoints) requires; state dicts of the older layout (``state["koala"]``)
still load.

Like every torch optimizer, a KOALA optimizer pickles and deep-copies with its
pending measurement (and KOALA-M its train/eval mode), loads state dicts whose
parameter groups lack a key added in a later version (filled with this
optimizer's defaults, as torch's ``__setstate__`` does), loads what the
``load_state_dict`` pre-hooks return, and refuses, naming both, the state of
another KOALA variant or of another optimizer.

KOALA measures the loss against a target of 0 (E1), so a loss must not be
negative: a step whose measured loss is negative is skipped like a non-finite
one and counted in ``state["koala"]["negative_loss_steps"]``, with a one-time
warning (at once when the loss is on the CPU, else when the signals are read).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Callable

import torch
from torch.optim.optimizer import _default_to_fused_or_foreach

from koala_hf.measurement import LossMeasurement
from koala_hf.optim.cpu_kernels import cpu_kernels
from koala_hf.optim.layers import StepWorkspace, bucketed_rows, dot, measurement_jacobians
from koala_hf.optim.sharding import check_parameter, local, reduce_sums, sharding_group

GLOBAL_STATE = "koala"
# A layer whose measurement Jacobian has a norm below this is not updated (official code).
MIN_JACOBIAN_NORM = 1e-9


def check_range(name: str, value, low=None, high=None, *, low_open=False, high_open=False) -> None:
    """Raise ``ValueError`` naming ``name`` and its allowed range unless ``value`` lies in it."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = value.item()  # hyperparameters are checked once, at construction, never inside step()
    inside = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if inside and low is not None:
        inside = value > low if low_open else value >= low
    if inside and high is not None:
        inside = value < high if high_open else value <= high
    if not inside:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        low_text = "-inf" if low is None else low
        high_text = "inf" if high is None else high
        raise ValueError(f"Invalid {name}: {value!r}; it must be a finite number in {left}{low_text}, {high_text}{right}")


def check_prior(group: dict) -> None:
    """Validate the initial uncertainty ``sigma`` (``P_0 = sigma``) and process noise ``q``."""
    check_range("sigma", group["sigma"], 0.0, low_open=True)
    check_range("q", group["q"], 0.0)


NOISE_MODES = ("second_moment", "variance", "none")


def check_noise(group: dict) -> None:
    """Validate the measurement-noise hyperparameters ``noise`` (E1a-E1c), ``r`` and ``alpha_r`` (E2)."""
    if group["noise"] not in NOISE_MODES:
        raise ValueError(f"Invalid noise: {group['noise']!r}; it must be one of {', '.join(NOISE_MODES)} (spec E1a-E1c)")
    if group["r"] is not None:
        check_range("r", group["r"], 0.0, low_open=True)
    check_range("alpha_r", group["alpha_r"], 0.0, 1.0, high_open=True)


class KoalaOptimizer(torch.optim.Optimizer):
    """Base class of the KOALA optimizers; subclasses implement ``_update``.

    ``_shared_hyperparameters`` names hyperparameters of the filter as a whole
    (e.g. KOALA-V's ``q``, which enters the shared ``P``): every parameter group
    must use the same value. Everything else is honoured per group.
    ``_float_state_keys`` names per-parameter scalar state kept in float32 or
    wider whatever the parameter's dtype.
    """

    _shared_hyperparameters: tuple[str, ...] = ()
    _float_state_keys: tuple[str, ...] = ()
    # Attributes that pickling and deepcopy carry besides torch's defaults, state and param_groups.
    _carried_attributes: tuple[str, ...] = ("_measurement",)

    def __init__(self, params, defaults: dict) -> None:
        self._measurement = LossMeasurement()
        self._warned_negative_loss = False
        super().__init__(params, defaults)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({name: self.__dict__[name] for name in self._carried_attributes if name in self.__dict__})
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_measurement" not in self.__dict__:
            self._measurement = LossMeasurement()
        self.__dict__.setdefault("_warned_negative_loss", False)
        for group in self.param_groups:  # groups saved before a hyperparameter existed get this optimizer's default
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # ----------------------------------------------------------------- groups
    def check_group(self, group: dict) -> None:
        """Validate one parameter group's hyperparameters (overridden per optimizer)."""
        check_range("lr", group["lr"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_noise(group)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError(f"{type(self).__name__} does not support complex parameters; use torch.view_as_real")
            self._check_parameter(p)
        self.check_group(group)
        first = self.param_groups[0]
        for name in self._shared_hyperparameters:
            if group[name] != first[name]:
                raise ValueError(
                    f"{type(self).__name__}'s {name} belongs to the whole filter and must be equal in every "
                    f"parameter group (got {first[name]!r} and {group[name]!r}); set it once in the constructor"
                )

    def _check_parameter(self, p: torch.Tensor) -> None:
        check_parameter(p, type(self).__name__)

    # ----------------------------------------------------------- diagnostics
    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """KOALA's own signals for logs: noise estimate ``R``, skipped steps, and the variant's.

        Reads values back from the device: call it when logging, not every step.
        """
        state = self.state.get(GLOBAL_STATE)
        if state is None:
            return {}
        signals = {
            "koala/R": state["R"].mean().item(),
            "koala/measured_loss": state["loss"].item(),
            "koala/skipped_steps": float(state["skipped_steps"].item()),
            "koala/negative_loss_steps": float(state["negative_loss_steps"].item()) if "negative_loss_steps" in state else 0.0,
        }
        if signals["koala/negative_loss_steps"] > 0 and not self._warned_negative_loss:
            self._warn_negative_loss()
        signals.update({key: value.item() for key, value in self._signals(state).items()})
        return signals

    def _signals(self, state: dict) -> dict[str, torch.Tensor]:
        return {}

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

        With a closure, the closure re-evaluates the model and returns the
        loss; if it did not call ``observe`` itself, its return value is
        observed (as the batch mean loss).
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
        if not self._measurement.pending and self._is_state_initialisation():
            self._create_state()
            return loss
        if not self._measurement.pending:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs the loss: KOALA measures the loss, not only the gradient. "
                "Call optimizer.observe(loss) (optionally with per_sample_losses=) after loss.backward(), "
                "pass a closure that returns the loss to step(), or train with koala_hf.KoalaTrainer."
            )
        mean_loss, noise_measurement = self._measurement.consume()
        state = self.global_state()
        device = state["step"].device
        mean_loss = mean_loss.to(device=device, dtype=state["R"].dtype)
        noise_measurement = noise_measurement.to(device=device, dtype=state["R"].dtype)

        previous_noise = state["R"]
        noise = self._noise_estimate(previous_noise, noise_measurement, mean_loss)
        negative = mean_loss < 0  # E1 measures against a target of 0: a negative loss would climb
        finite = torch.isfinite(mean_loss) & torch.isfinite(noise_measurement) & ~negative
        ok = self._update(mean_loss, noise, finite)

        state["R"] = torch.where(ok, noise, previous_noise)
        state["skipped_steps"].add_(~ok)
        state["negative_loss_steps"].add_(negative)
        state["step"].add_(ok)  # steps taken; skipped ones are counted apart
        state["loss"] = torch.where(ok, mean_loss, state["loss"])
        return loss

    def _is_state_initialisation(self) -> bool:
        """A first ``step()`` without a loss at learning rate 0: how ``torch.distributed.checkpoint`` creates an
        optimizer's state before saving or loading it (FSDP2 checkpoints). It needs no measurement."""
        return not self.state and all(float(group["lr"]) == 0 for group in self.param_groups)

    def _create_state(self) -> None:
        """Create the filter-wide state and the state of every parameter with a gradient, without a step."""
        self.global_state()
        for group in self.param_groups:
            for p in self._params_with_grad(group)[0]:
                self._layer_state(p)

    def _layer_state(self, p: torch.Tensor) -> dict:
        """The state of one parameter, created on first use (overridden by variants that keep some)."""
        return self.state[p]

    def _update(self, loss: torch.Tensor, noise: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Apply one step; ``noise[i]`` is ``R_k`` of group ``i``. Return the device flag "step taken"."""
        raise NotImplementedError

    def _noise_estimate(self, previous: torch.Tensor, second_moment: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """``R_k`` of every group: fixed ``r``, or ``alpha_r R_{k-1} + (1 - alpha_r) m_k`` (E2).

        ``m_k`` by the group's ``noise`` mode: ``second_moment`` ``mean(l_i^2)`` (E1a), ``variance``
        ``mean(l_i^2) - L_k^2`` over the step's whole sample set (E1b; 0 without per-sample losses), or
        ``none``, 0 (E1c).
        """
        measurements = {
            "second_moment": second_moment,
            "variance": torch.clamp(second_moment - loss * loss, min=0.0),
            "none": torch.zeros_like(second_moment),
        }
        estimates = []
        for index, group in enumerate(self.param_groups):
            if group["r"] is not None:
                estimates.append(torch.full_like(second_moment, group["r"]))
            else:
                alpha = group["alpha_r"]
                estimates.append(alpha * previous[index] + (1.0 - alpha) * measurements[group["noise"]])
        return torch.stack(estimates)

    # ----------------------------------------------------------------- state
    def _workspace(self, name: str) -> StepWorkspace:
        """The foreach paths' reused temporaries ``name`` (``"H"``, KOALA-M's ``"d"``) on the CPU; not state:
        never saved, rebuilt after a load."""
        workspaces = self.__dict__.setdefault("_workspaces", {})
        if name not in workspaces:
            workspaces[name] = StepWorkspace()
        return workspaces[name]

    def _jacobians(self, stepped, params, grads, weight_decay: float, foreach: bool) -> list[torch.Tensor]:
        """``H`` per layer (E3, :func:`measurement_jacobians`), into the reused ``"H"`` workspace on the CPU's
        foreach path (with ``wd == 0``, ``H`` is the gradient itself and needs none)."""
        workspace = self._workspace("H").get(stepped, params) if foreach and weight_decay else None
        return measurement_jacobians(params, grads, weight_decay, foreach, out=workspace)

    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    def _scalar_dtype(self) -> torch.dtype:
        """float64 when any parameter is float64, else float32 (reductions never below float32)."""
        wide = any(p.dtype == torch.float64 for g in self.param_groups for p in g["params"])
        return torch.float64 if wide else torch.float32

    def global_state(self) -> dict:
        """The filter-wide state (created on first use): counters, ``R`` per group, and the subclass's."""
        state = self.state.get(GLOBAL_STATE)
        if state is None:
            options = {"device": self._device(), "dtype": self._scalar_dtype()}
            state = {
                "step": torch.zeros((), dtype=torch.int64, device=options["device"]),
                "skipped_steps": torch.zeros((), dtype=torch.int64, device=options["device"]),
                "negative_loss_steps": torch.zeros((), dtype=torch.int64, device=options["device"]),
                "R": torch.ones(len(self.param_groups), **options),  # R_0 = 1 (E2)
                "loss": torch.full((), float("nan"), **options),
            }
            state.update(self._init_global_state(options))
            self.state[GLOBAL_STATE] = state
        if "negative_loss_steps" not in state:  # state saved before the counter existed
            state["negative_loss_steps"] = torch.zeros_like(state["skipped_steps"])
        if state["R"].numel() < len(self.param_groups):  # groups added since
            extra = torch.ones(len(self.param_groups) - state["R"].numel(), dtype=state["R"].dtype, device=state["R"].device)
            state["R"] = torch.cat([state["R"], extra])
        return state

    def _init_global_state(self, options: dict) -> dict:
        return {}

    def _params_with_grad(self, group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            self._check_parameter(p)  # parameters swapped in after construction (accelerate's FSDP2 preparation)
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if torch.is_complex(p.grad):
                raise RuntimeError(f"{type(self).__name__} does not support complex gradients")
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _whole_layer_sums(self, local_sums: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-layer sums of whole layers from each group's ``[n_layers, k]`` sums over this process's elements.

        ``params`` are the parameters stepped (DTensors among them name the sharding group). Under FSDP2 the
        groups' sums are stacked into one ``all_reduce`` (koala_hf.optim.sharding); otherwise they are the
        whole layers' sums already and come back as they are.
        """
        group = sharding_group(params, type(self).__name__)
        if group is None:
            return local_sums
        reduced = reduce_sums(torch.cat(local_sums), group)
        return list(reduced.split([len(sums) for sums in local_sums]))

    def _jacobian_norms(self, ok: torch.Tensor, device, dtype, extra_sums=None, averages=None):
        """First pass of KOALA-V and KOALA-M: per group, ``H`` (E3) and ``[||H||^2, ||theta||^2]`` per layer.

        ``extra_sums(params, local_params, local_jacobians, dtype, foreach)``, when given, returns more per-layer sums
        (``[n_layers, k]``), appended as columns and reduced with the rest; with ``fused=True`` on the CPU the
        multi-tensor kernel computes them instead, KOALA-M's ``[d.d, d.H]`` from ``averages(stepped)`` (the
        layers' ``w_avg``). Returns ``(measured, ok)``: ``(index, group, stepped, params, jacobians, norms,
        foreach, kernels)`` per group with gradients, where ``stepped`` are the parameters themselves,
        ``params`` and ``jacobians`` this process's shards under FSDP2 (the parameters otherwise; with
        ``kernels``, the CPU kernels of a fused group, the gradients: the kernels recompute ``H``), the norms
        the whole layers' (one reduction over the shards of every layer), and ``ok`` cleared when any norm is
        not finite.
        """
        measured = []
        for index, group in enumerate(self.param_groups):
            params, grads = self._params_with_grad(group)
            if not params:
                continue
            for p in params:
                self._layer_state(p)  # an entry per parameter, as torch.distributed.checkpoint expects
            stepped = params
            params, grads = [local(p) for p in params], [local(g) for g in grads]
            foreach = self._foreach(group, params)
            wd = group["weight_decay"]
            kernels = self._fused_cpu_kernels(group, params)
            if kernels is not None:
                jacobians = grads
                lists = [params, grads] + ([[local(w) for w in averages(stepped)]] if averages else [])
                norms = bucketed_rows(lists, lambda p, g, *w: kernels.koala_jacobian_sums(p, g, w[0] if w else [], wd))
                norms = norms.to(device, dtype)
                if not wd:
                    norms[:, 1] = 0.0  # ||theta||^2 only enters through wd (E3), as in the other paths
            else:
                jacobians = self._jacobians(stepped, params, grads, wd, foreach)
                zero = torch.zeros((), dtype=dtype, device=device)
                norms = torch.stack(
                    [torch.stack([dot(h, h, dtype).to(device), dot(p, p, dtype).to(device) if wd else zero])
                     for p, h in zip(params, jacobians)]
                )
                if extra_sums is not None:
                    norms = torch.cat([norms, extra_sums(stepped, params, jacobians, dtype, foreach).to(device)], dim=1)
            measured.append((index, group, stepped, params, jacobians, norms, foreach, kernels))
        if not measured:
            return [], ok
        whole = self._whole_layer_sums([m[5] for m in measured], [p for m in measured for p in m[2]])
        ok = ok & torch.isfinite(torch.cat(whole)).all()
        return [(*m[:5], norms, *m[6:]) for m, norms in zip(measured, whole)], ok

    def _fused_cpu_kernels(self, group: dict, params: list[torch.Tensor]):
        """KOALA-V/M with ``fused=True``: the multi-tensor CPU kernels (koala_hf.optim.cpu_kernels), or ``None``
        (not fused; or the kernels cannot be built here, which :func:`cpu_kernels` warned about: foreach then)."""
        if not group.get("fused"):
            return None
        self._refuse_fused_off_cpu(params)
        return cpu_kernels()

    def _refuse_fused_off_cpu(self, params: list[torch.Tensor]) -> None:
        devices = sorted({p.device.type for p in params} - {"cpu"})
        if devices:
            raise RuntimeError(
                f"{type(self).__name__}(fused=True) has CPU kernels only, and parameters are on {', '.join(devices)}; "
                "use foreach=True there (the default on CUDA), or KOALAPlusPlus(fused=True)"
            )

    def _foreach(self, group: dict, params: list[torch.Tensor]) -> bool:
        if group["foreach"] is not None:
            return bool(group["foreach"])
        return _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]

    def state_dict(self) -> dict:
        """torch's state dict, with the filter-wide state in the first parameter group's ``"koala"`` entry."""
        state_dict = super().state_dict()
        state = dict(state_dict["state"])
        groups = [dict(group) for group in state_dict["param_groups"]]
        filter_state = state.pop(GLOBAL_STATE, None)
        if filter_state is not None:
            groups[0][GLOBAL_STATE] = filter_state
        return {**state_dict, "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state as torch does, then put KOALA's scalar state back on the right device and dtype.

        The ``load_state_dict`` pre-hooks run first and what they return is
        loaded. The state of another KOALA variant or another optimizer is
        refused. torch casts every floating per-parameter tensor to the
        parameter's dtype and keeps state that is not keyed by a parameter as is
        (on the device it was saved from, and shared with ``state_dict``).
        KOALA's scalar state stays in float32 or wider, moves to the parameters'
        device, and counters saved as Python numbers become tensors again.
        """
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._refuse_foreign_state(state_dict)
        hooks, self._optimizer_load_state_dict_pre_hooks = self._optimizer_load_state_dict_pre_hooks, OrderedDict()
        try:  # the hooks have run: torch must not run them a second time
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks
        for group in self.param_groups:  # the filter-wide state travels in the first group (state_dict)
            filter_state = group.pop(GLOBAL_STATE, None)
            if filter_state is not None:
                self.state[GLOBAL_STATE] = filter_state
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            for key in self._float_state_keys:
                if key in saved:
                    dtype = torch.promote_types(saved[key].dtype, torch.float32)
                    self.state[p][key] = saved[key].to(device=p.device, dtype=dtype, copy=True)
        if GLOBAL_STATE in self.state:
            self.state[GLOBAL_STATE] = self._restore_global_state(self.state[GLOBAL_STATE])

    def _restore_global_state(self, saved: dict) -> dict:
        device, dtype = self._device(), self._scalar_dtype()
        restored = {}
        for key, value in saved.items():
            if isinstance(value, torch.Tensor):
                restored[key] = value.to(device=device, copy=True)
            elif key in ("step", "skipped_steps", "negative_loss_steps"):  # counters handed back as Python numbers
                restored[key] = torch.tensor(int(value), dtype=torch.int64, device=device)
            elif isinstance(value, (int, float, list, tuple)) and not isinstance(value, bool):
                restored[key] = torch.tensor(value, dtype=dtype, device=device)
            else:
                restored[key] = value
        return restored

    def _refuse_foreign_state(self, state_dict: dict) -> None:
        """Raise ``ValueError`` naming both when ``state_dict`` is another variant's or another optimizer's."""
        saved = saved_variant(state_dict)
        if saved is not None and saved not in {cls.__name__ for cls in type(self).__mro__}:
            raise ValueError(
                f"This optimizer state was saved by {saved}; it cannot be loaded into {type(self).__name__}, whose "
                f"state differs. Load it into a {saved} built over the same parameters, or start {type(self).__name__} "
                "from fresh state (leave the optimizer state out of the checkpoint you load)."
            )


# The variants by the state they keep: per parameter, filter-wide, and (for state dicts without any state yet)
# a hyperparameter only their parameter groups have.
_VARIANTS = (
    ("KOALAM", {"u", "w_avg"}, {"qw_avg"}, "sw"),
    ("KOALAPlusPlus", {"v", "H_prev", "filter"}, set(), "symmetric"),
    ("KOALAV", {"information"}, {"P"}, "sigma"),
)


def saved_variant(state_dict: dict) -> str | None:
    """The class that saved ``state_dict``: a KOALA variant's name, a description of another optimizer, or ``None``."""
    state = state_dict.get("state", {})
    layer_keys = set().union(*(set(v) for k, v in state.items() if k != GLOBAL_STATE))
    groups = state_dict.get("param_groups", [])
    global_keys = set(state.get(GLOBAL_STATE, {})) | set(groups[0].get(GLOBAL_STATE, {}) if groups else {})
    for name, layer, filter_wide, _ in _VARIANTS:
        if layer_keys & layer or global_keys & filter_wide:
            return name
    if layer_keys:
        return f"another optimizer (state {', '.join(sorted(layer_keys))})"
    if groups:
        for name, _, _, marker in _VARIANTS:
            if all(marker in g for g in groups):
                return name
        return f"another optimizer (hyperparameters {', '.join(sorted(set(groups[0]) - {'params', GLOBAL_STATE}))})"
    return None
