"""KOALA-M: the Kalman optimizer with a velocity (momentum) state (spec E30-E36)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from koala_hf.optim import layouts, triton_step
from koala_hf.optim.base import KoalaOptimizer
from koala_hf.optim.checkpoint import FILTER_STATE
from koala_hf.optim.dispatch import Backend
from koala_hf.optim.group_step import complete_sums, gather, reduce_by_backend, update_by_backend
from koala_hf.optim.koala_m_passes import REDUCTIONS, UPDATES
from koala_hf.optim.layers import MIN_JACOBIAN_NORM, dot
from koala_hf.optim.sharding import local, reduce_sums, sharding_group
from koala_hf.optim.validation import check_range

# E34: w_avg <- AVERAGE_KEEP w_avg + AVERAGE_TAKE theta. E30: qw_avg <- NOISE_KEEP qw_avg + NOISE_TAKE d.
AVERAGE_KEEP, AVERAGE_TAKE = 0.9, 0.1
NOISE_KEEP, NOISE_TAKE = 0.9, 0.1
# KOALA-M's own columns and constants of its scalar kernel (triton_step.fused_scalar_step).
# (The averaging constants go in the float64 table too: a Triton constexpr float is a float32.)
SCALAR_HYPERPARAMETERS = {"a": lambda g: g["a"], "qv": lambda g: g["qv"], "average_keep": lambda g: AVERAGE_KEEP,
                          "average_take": lambda g: AVERAGE_TAKE, "average_keep_squared": lambda g: AVERAGE_KEEP * AVERAGE_KEEP,
                          "noise_keep": lambda g: NOISE_KEEP, "noise_take": lambda g: NOISE_TAKE}


class KOALAM(KoalaOptimizer):
    r"""KOALA-M (Davtyan et al., 2022), spec E30-E36.

    Per layer: velocity ``u`` and running weight average ``w_avg``; shared: a
    2x2 covariance ``P = [[sw, sc], [sc, sv]]``, transition ``[[1, 1], [0, a]]``
    and process noise ``diag(qw_avg, qv)`` with ``qw_avg`` adapted (E30).

    One ``step()`` per iteration: the first call predicts (E30-E32), every call
    updates (E33-E36) and then predicts for the next iteration, so the next
    forward pass sees the predicted weights ``theta + u``. Call :meth:`eval`
    before evaluating or saving a model to switch the parameters to the
    posterior weights, and :meth:`train` before training again
    (``transformers.Trainer`` calls both). The switch adds or subtracts
    ``u / a``, exact up to floating-point rounding.

    ``sw, sc, sv, a, qw, qv`` describe the shared filter and must be equal in
    every parameter group (they are read from the first); ``lr``,
    ``weight_decay``, ``r`` and ``alpha_r`` may differ.

    A parameter whose ``grad`` is ``None`` at a step (frozen, or unused) is
    skipped altogether at that step, as torch documents: no update (E33) and
    no predict (E31) for it; it keeps its ``u`` and ``w_avg`` and is left out
    of E30's distance and E35's max (spec, under E31). Parameters added with
    ``add_param_group`` after steps start with ``u = w_avg = 0``.

    ``noise`` chooses the loss-noise measurement (E1a ``"second_moment"``, the
    default; E1b ``"variance"``; E1c ``"none"``), per group, as in
    :class:`KOALAPlusPlus`.

    Under FSDP2 the per-layer sums (``||H||^2``, and for E30's distance
    ``d.d`` and ``d.H`` with ``d = w_avg - theta``, from which the distance after
    the update follows without another pass) go in the one collective of the
    step; the first step adds one more, for E30's first ``||theta||``.

    ``fused=True`` runs the sums pass and the update with E31's predict
    without the temporaries ``H`` and ``d``: on the CPU as one multi-tensor C++
    call each for every layer of a dtype (koala_hf.optim.cpu_kernels; built on
    first use), on CUDA as three Triton launches per dtype
    (koala_hf.optim.triton_kernels; ``fused="triton"`` asks for them, also on
    the CPU under ``TRITON_INTERPRET=1``).
    The default ``fused=None`` is the Triton kernels on CUDA and no fused
    backend elsewhere (koala_hf.optim.dispatch).
    """

    layer_state_keys = ("u", "w_avg")
    filter_state_keys = ("P", "qw_avg")
    identifying_hyperparameters = ("sw", "sv", "a")
    shared_hyperparameters = ("sw", "sc", "sv", "a", "qw", "qv")
    _carried_attributes = ("_measurement", "_mode_before_state")

    def __init__(
        self,
        params,
        lr: float = 1.0,
        sw: float = 0.1,
        sc: float = 0.0,
        sv: float = 0.1,
        a: float = 0.9,
        qw: float = 0.01,
        qv: float = 0.01,
        r: float | None = None,
        alpha_r: float = 0.9,
        noise: str = "second_moment",
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        fused: bool | str | None = None,
    ) -> None:
        self._mode_before_state = True  # training; the filter-wide state holds the mode once it exists (training)
        defaults = dict(
            lr=lr, sw=sw, sc=sc, sv=sv, a=a, qw=qw, qv=qv, r=r, alpha_r=alpha_r, noise=noise,
            weight_decay=weight_decay, foreach=foreach, fused=fused,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        if "_training" in state:  # pickled before 0.3, when the mode was also kept here
            state["_mode_before_state"] = state.pop("_training")
        super().__setstate__(state)

    def check_group(self, group: dict) -> None:
        super().check_group(group)
        check_range("sw", group["sw"], 0.0, low_open=True)
        check_range("sv", group["sv"], 0.0)
        check_range("sc", group["sc"])
        if group["sc"] ** 2 > group["sw"] * group["sv"]:
            raise ValueError(
                f"Invalid sc: {group['sc']!r}; P = [[sw, sc], [sc, sv]] must be positive semi-definite, "
                f"so sc^2 must not exceed sw * sv = {group['sw'] * group['sv']!r}"
            )
        check_range("a", group["a"], 0.0, 1.0, low_open=True, high_open=True)
        check_range("qw", group["qw"], 0.0)
        check_range("qv", group["qv"], 0.0)

    # -------------------------------------------------------- train / eval
    def train(self) -> None:
        """Parameters hold the predicted weights ``theta + u`` that the next forward pass needs."""
        self._set_mode(training=True)

    def eval(self) -> None:
        """Parameters hold the posterior weights (evaluation, saving a model)."""
        self._set_mode(training=False)

    @property
    def training(self) -> bool:
        """Whether the parameters hold the predicted weights (train mode) or the posterior ones (eval mode): kept
        in the filter-wide state (saved with it), and before the first step, when both are the same weights, here."""
        state = self.state.get(FILTER_STATE)
        return self.__dict__.get("_mode_before_state", True) if state is None else bool(state["training"])

    @torch.no_grad()
    def _set_mode(self, training: bool) -> None:
        state = self.state.get(FILTER_STATE)
        if state is None:  # nothing predicted yet: the weights are the same in both modes
            self._mode_before_state = training
            return
        if state["training"] == training:
            return
        # After the trailing predict, theta = posterior + u_post and u = a u_post (E31).
        shift = (1.0 if training else -1.0) / self.shared("a")
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    p.add_(self.state[p]["u"], alpha=shift)
        state["training"] = training

    # ---------------------------------------------------------------- state
    def _init_filter_state(self, options: dict) -> dict:
        """At the first step: every layer's ``u`` and ``w_avg``, and the first call's predict (E30, E32)."""
        shared = {name: self.shared(name) for name in self.shared_hyperparameters}
        params = [p for group in self.param_groups for p in group["params"]]
        for p in params:
            self._layer_state(p)
        stepped = [p for p in params if p.grad is not None] or params  # E30's distance: the parameters stepped
        self.check_new_parameters(stepped)  # before this first collective
        local_sum = sum(dot(local(p), local(p), options["dtype"]).to(options["device"]) for p in stepped)
        theta_sq = reduce_sums(local_sum.reshape(1), sharding_group(stepped, type(self).__name__))[0]
        qw_avg = torch.full((), float(shared["qw"]), **options)
        distance = torch.sqrt(theta_sq) / sum(p.numel() for p in stepped)  # w_avg = 0, u = 0
        covariance = torch.tensor([[shared["sw"], shared["sc"]], [shared["sc"], shared["sv"]]], **options)
        qw_avg, covariance = _predict_covariance(covariance, qw_avg, distance, shared)
        return {"P": covariance, "qw_avg": qw_avg, "training": self.__dict__.pop("_mode_before_state", True)}

    def _layer_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["u"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["w_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _signals(self, state: dict) -> dict:
        return {"koala/P_weights": state["P"][0, 0], "koala/P_velocity": state["P"][1, 1], "koala/qw_avg": state["qw_avg"]}

    def _update(self, inputs):
        state = inputs.state
        if not state["training"]:
            raise RuntimeError("KOALAM.step() was called in eval mode; call optimizer.train() first")
        device, dtype = state["R"].device, state["R"].dtype
        covariance = state["P"]
        group_steps = gather(self)
        reduction = reduce_by_backend(self, group_steps, REDUCTIONS, device, dtype)
        fused = triton_step.fused_scalar_step(
            self, group_steps, reduction, inputs, "koala_m_coefficients", SCALAR_HYPERPARAMETERS,
            lambda batch: (covariance, state["qw_avg"], float(max(batch.n_elements, 1))), {})
        if fused is not None:  # every group on the Triton kernels: E1, E2 and E30-E36 ran in one launch
            coefficients, ok = fused
            reduction.plans[Backend.TRITON].update("koala_m_update", [coefficients], ok, self.shared("a"))
            return ok
        loss, noise_estimates, ok = inputs.measured.loss, inputs.measured.estimates, inputs.measured.ok
        whole, ok = complete_sums(group_steps, reduction.sums, ok, type(self).__name__)

        information = [torch.zeros(1, dtype=dtype, device=device)]  # ||H||^2 / S of updated layers (E35)
        distance_sq = torch.zeros((), dtype=dtype, device=device)
        n_params = 0
        coefficients = []
        for step, sums in zip(group_steps, whole):
            result = koala_m_coefficients(sums, covariance, loss=loss, r_k=noise_estimates[step.index], ok=ok,
                                          lr=step.group["lr"], weight_decay=step.weight_decay)
            information.append(result.information)
            distance_sq = distance_sq + result.distance_sq
            n_params += sum(p.numel() for p in step.params)
            coefficients.append(result.coefficients)
        update_by_backend(self, group_steps, UPDATES, coefficients, ok, reduction.plans, self.shared("a"), dtype)

        h = torch.cat(information).max()  # E35
        column = covariance[:, 0]
        posterior = covariance - h * torch.outer(column, column)  # E36
        distance = torch.sqrt(torch.where(ok, distance_sq, 0.0)) / max(n_params, 1)
        shared = {name: self.shared(name) for name in self.shared_hyperparameters}
        qw_avg, predicted = _predict_covariance(posterior, state["qw_avg"], distance, shared)
        state["P"] = torch.where(ok, predicted, covariance)
        state["qw_avg"] = torch.where(ok, qw_avg, state["qw_avg"])
        return ok

class KoalaMCoefficients(NamedTuple):
    coefficients: torch.Tensor  # [n, 4], in the layout's columns of coefficients (E33, E34)
    information: torch.Tensor  # [n]: ||H||^2 / S of an updated layer, else 0 (E35's terms)
    distance_sq: torch.Tensor  # sum over the layers of ||w_avg - theta||^2 after the update (E30)


def koala_m_coefficients(sums, covariance, *, loss, r_k, ok, lr, weight_decay) -> KoalaMCoefficients:
    """E33-E35 for a batch of layers from their ``[n, 4]`` rows of ``||H||^2``, ``||theta||^2``, ``d.d`` and
    ``d.H`` in the layout's columns, with ``d = w_avg - theta`` before the update (pure, on the device). The
    coefficients are those of ``theta <- theta + step_theta H``, ``u <- u + step_u H`` and
    ``w_avg <- keep_avg w_avg + take_theta theta``."""
    columns = layouts.KOALA_M.unstack("sums", sums)
    hh, theta_sq, dd, dh = columns["hh"], columns["theta_theta"], columns["dd"], columns["dh"]
    s = hh * covariance[0, 0] + r_k  # E33
    scale = lr * (loss + 0.5 * weight_decay * theta_sq) / s
    k1, k2 = scale * covariance[0, 0], scale * covariance[1, 0]
    update = ok & (hh >= MIN_JACOBIAN_NORM**2) & (s > 0) & torch.isfinite(k1) & torch.isfinite(k2)
    # E30's distance after E33-E34, ||w_avg - theta||^2: an updated layer has moved theta by -k1 H and
    # w_avg to AVERAGE_KEEP w_avg + AVERAGE_TAKE theta (E34), so w_avg - theta = AVERAGE_KEEP (d + k1 H);
    # the others keep d.
    moved = AVERAGE_KEEP * AVERAGE_KEEP * (dd + 2.0 * k1 * dh + k1 * k1 * hh)
    zero = torch.zeros_like(s)
    coefficients = layouts.KOALA_M.stack("coefficients", {
        "step_theta": torch.where(update, -k1, zero),
        "step_u": torch.where(update, -k2, zero),
        "keep_avg": torch.where(update, AVERAGE_KEEP, torch.ones_like(s)),  # E34
        "take_theta": torch.where(update, AVERAGE_TAKE, zero),
    })
    return KoalaMCoefficients(coefficients, torch.where(update, hh / s, 0.0), torch.where(update, moved, dd).sum())


def _predict_covariance(covariance, qw_avg, distance, shared: dict):
    """E30's running ``qw_avg`` and E32's ``P = F P F^T + diag(qw_avg, qv)``."""
    qw_avg = NOISE_KEEP * qw_avg + NOISE_TAKE * distance
    transition = torch.eye(2, dtype=covariance.dtype, device=covariance.device)  # [[1, 1], [0, a]], built on the device
    transition[0, 1] = 1.0
    transition[1, 1] = shared["a"]
    process_noise = torch.diag(torch.stack([qw_avg, torch.full_like(qw_avg, shared["qv"])]))
    return qw_avg, transition @ covariance @ transition.T + process_noise
