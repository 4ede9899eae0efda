"""What every KOALA optimizer shares: the loss protocol, noise estimate, skips, checkpoints.

KOALA measures the loss, not only the gradient, so a step needs the loss of the
batch it consumes: ``observe(loss, per_sample_losses)`` after the backward pass
(several times under gradient accumulation), then ``step()``; or
``step(closure)`` with a closure returning the loss, as in torch. ``zero_grad()``
discards a measurement no step consumed.

Scalar state that belongs to the whole filter (the noise estimate ``R`` of each
parameter group (E2), step and skip counters, KOALA-V's ``P``, KOALA-M's ``P``
and ``qw_avg``) lives in ``self.state["koala"]``, so ``state_dict()`` carries it
next to the per-parameter state.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.optimizer import _default_to_fused_or_foreach

from koala_hf.measurement import LossMeasurement
from koala_hf.optim.layers import dot, measurement_jacobians

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


def check_noise(group: dict) -> None:
    """Validate the measurement-noise hyperparameters ``r`` and ``alpha_r`` (E2)."""
    if group["r"] is not None:
        check_range("r", group["r"], 0.0, low_open=True)
    check_range("alpha_r", group["alpha_r"], 0.0, 1.0, high_open=True)


def _is_sharded(p: torch.Tensor) -> bool:
    """FSDP2/tensor-parallel DTensors and FSDP1's FlatParameter hold parts or concatenations of tensors."""
    return type(p).__name__ in ("DTensor", "FlatParameter")


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

    def __init__(self, params, defaults: dict) -> None:
        self._measurement = LossMeasurement()
        super().__init__(params, defaults)

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
            if _is_sharded(p):
                raise ValueError(
                    f"{type(self).__name__} got a sharded or flattened parameter ({type(p).__name__}). KOALA computes "
                    "dot products over each whole parameter tensor (E11-E15); on shards or flattened groups of "
                    "tensors they would silently compute a different algorithm. Train with DDP (one full copy of "
                    "the model per process) instead of FSDP or DeepSpeed ZeRO."
                )
        self.check_group(group)
        first = self.param_groups[0]
        for name in self._shared_hyperparameters:
            if group[name] != first[name]:
                raise ValueError(
                    f"{type(self).__name__}'s {name} belongs to the whole filter and must be equal in every "
                    f"parameter group (got {first[name]!r} and {group[name]!r}); set it once in the constructor"
                )

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
        }
        signals.update({key: value.item() for key, value in self._signals(state).items()})
        return signals

    def _signals(self, state: dict) -> dict[str, torch.Tensor]:
        return {}

    # ----------------------------------------------------------- measurement
    def observe(self, loss, per_sample_losses: torch.Tensor | None = None) -> None:
        """Record the measurement for the next ``step()`` (E1). See :class:`LossMeasurement`."""
        self._measurement.observe(loss, per_sample_losses, device=self._device())

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
        noise = self._noise_estimate(previous_noise, noise_measurement)
        finite = torch.isfinite(mean_loss) & torch.isfinite(noise_measurement)
        ok = self._update(mean_loss, noise, finite)

        state["R"] = torch.where(ok, noise, previous_noise)
        state["skipped_steps"].add_(~ok)
        state["step"].add_(ok)  # steps taken; skipped ones are counted apart
        state["loss"] = torch.where(ok, mean_loss, state["loss"])
        return loss

    def _update(self, loss: torch.Tensor, noise: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Apply one step; ``noise[i]`` is ``R_k`` of group ``i``. Return the device flag "step taken"."""
        raise NotImplementedError

    def _noise_estimate(self, previous: torch.Tensor, measurement: torch.Tensor) -> torch.Tensor:
        """``R_k`` of every group: fixed ``r``, or ``alpha_r R_{k-1} + (1 - alpha_r) m_k`` (E2)."""
        estimates = []
        for index, group in enumerate(self.param_groups):
            if group["r"] is not None:
                estimates.append(torch.full_like(measurement, group["r"]))
            else:
                alpha = group["alpha_r"]
                estimates.append(alpha * previous[index] + (1.0 - alpha) * measurement)
        return torch.stack(estimates)

    # ----------------------------------------------------------------- state
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
                "R": torch.ones(len(self.param_groups), **options),  # R_0 = 1 (E2)
                "loss": torch.full((), float("nan"), **options),
            }
            state.update(self._init_global_state(options))
            self.state[GLOBAL_STATE] = state
        elif state["R"].numel() < len(self.param_groups):  # groups added since
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
            if _is_sharded(p):
                raise RuntimeError(
                    f"{type(self).__name__} is stepping a sharded or flattened parameter ({type(p).__name__}): "
                    "KOALA needs whole parameter tensors (E11-E15); use DDP instead of FSDP / DeepSpeed ZeRO"
                )
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if torch.is_complex(p.grad):
                raise RuntimeError(f"{type(self).__name__} does not support complex gradients")
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _jacobian_norms(self, ok: torch.Tensor, device, dtype):
        """First pass of KOALA-V and KOALA-M: per group, ``H`` (E3) and ``[||H||^2, ||theta||^2]`` per layer.

        Returns ``(measured, ok)``: ``(index, group, params, jacobians, norms, foreach)`` per group with
        gradients, and ``ok`` cleared when any norm is not finite.
        """
        measured = []
        for index, group in enumerate(self.param_groups):
            params, grads = self._params_with_grad(group)
            if not params:
                continue
            foreach = self._foreach(group, params)
            wd = group["weight_decay"]
            jacobians = measurement_jacobians(params, grads, wd, foreach)
            zero = torch.zeros((), dtype=dtype, device=device)
            norms = torch.stack(
                [torch.stack([dot(h, h, dtype).to(device), dot(p, p, dtype).to(device) if wd else zero])
                 for p, h in zip(params, jacobians)]
            )
            ok = ok & torch.isfinite(norms).all()
            measured.append((index, group, params, jacobians, norms, foreach))
        return measured, ok

    def _foreach(self, group: dict, params: list[torch.Tensor]) -> bool:
        if group["foreach"] is not None:
            return bool(group["foreach"])
        return _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state as torch does, then put KOALA's scalar state back on the right device and dtype.

        torch casts every floating per-parameter tensor to the parameter's dtype
        and keeps state that is not keyed by a parameter as is (on the device it
        was saved from, and shared with ``state_dict``). KOALA's scalar state
        stays in float32 or wider and moves to the parameters' device.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            for key in self._float_state_keys:
                if key in saved:
                    dtype = torch.promote_types(saved[key].dtype, torch.float32)
                    self.state[p][key] = saved[key].to(device=p.device, dtype=dtype, copy=True)
        if GLOBAL_STATE in self.state:
            device = self._device()
            self.state[GLOBAL_STATE] = {
                key: value.to(device=device, copy=True) if isinstance(value, torch.Tensor) else value
                for key, value in self.state[GLOBAL_STATE].items()
            }
