"""KOALA-M: the Kalman optimizer with a velocity (momentum) state (spec E30-E36)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from koala_hf.optim import host_coefficients, layouts, triton_step
from koala_hf.optim.base import KoalaOptimizer
from koala_hf.optim.checkpoint import FILTER_STATE
from koala_hf.optim.cpu_kernels import cpu_kernels
from koala_hf.optim.dispatch import Backend
from koala_hf.optim.group_step import (
    GroupStep,
    complete_sums,
    eager_reduction,
    eager_update,
    foreach_update,
    gather,
    group_by_group_sums,
    group_by_group_update,
    reduce_by_backend,
    update_by_backend,
)
from koala_hf.optim.jacobian_norms import cpu_norms, eager_norms, triton_norms
from koala_hf.optim.layers import MIN_JACOBIAN_NORM, dot, dots, finite_mask, group_by_device_and_dtype, widen, write_back
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


# --------------------------------------------------------------- the passes
def _eager_sums(distances_of: Callable) -> Callable:
    """The per-group reduction of an eager backend: ``||H||^2``, ``||theta||^2``, ``d.d`` and ``d.H`` per layer from
    the formed ``H``, with ``d = w_avg - theta`` before the update (E30's distance, see
    :func:`koala_m_coefficients`) from ``distances_of(optimizer, step, dtype)``."""

    def sums(optimizer: KOALAM, step: GroupStep, jacobians, device, dtype, foreach: bool) -> torch.Tensor:
        distances = distances_of(optimizer, step, dtype)
        columns = eager_norms(step, jacobians, device, dtype, foreach)
        columns["dd"] = dots(distances, None, dtype, foreach, device)
        columns["dh"] = dots(distances, jacobians, dtype, foreach, device)
        return layouts.KOALA_M.stack("sums", columns)

    return sums


def _per_tensor_distances(optimizer: KOALAM, step: GroupStep, dtype) -> list[torch.Tensor]:
    """``d = w_avg - theta`` per layer, never in 16 bits."""
    return [w.to(dtype) - theta.to(dtype) for w, theta in zip(step.state_shards("w_avg"), step.shards)]


def _foreach_distances(optimizer: KOALAM, step: GroupStep, dtype) -> list[torch.Tensor]:
    """``d = w_avg - theta`` with multi-tensor ops, on the CPU into the optimizer's reused workspace, in ``dtype``
    (layers in another dtype, 16-bit ones, are converted first)."""
    averages, thetas = step.state_shards("w_avg"), step.shards
    if any(theta.dtype != dtype for theta in thetas):
        averages, thetas = [w.to(dtype) for w in averages], [theta.to(dtype) for theta in thetas]
    out = optimizer._workspace("d").get(step.params, step.shards) if thetas is step.shards else None
    if out is None:
        return list(torch._foreach_sub(averages, thetas))
    torch._foreach_copy_(out, averages)
    torch._foreach_sub_(out, thetas)
    return out


@group_by_group_sums
def _cpu_sums(optimizer: KOALAM, step: GroupStep, device, dtype) -> torch.Tensor:
    return cpu_norms(step, layouts.KOALA_M, "koala_m_sums", device, dtype)


def _triton_sums(optimizer: KOALAM, group_steps: list[GroupStep], device, dtype):
    return triton_norms(optimizer, group_steps, layouts.KOALA_M, "koala_m_partials", device, dtype)


def _eager_update(update_layers: Callable, predict: Callable) -> Callable:
    """The update pass of an eager backend: E33, E34 (``update_layers``), then E31's predict (``predict``), on the
    formed ``H``, masked by ``ok``."""

    @eager_update
    def update(optimizer: KOALAM, step: GroupStep, jacobians, coefficients, ok, a: float, dtype) -> None:
        jacobians = finite_mask(jacobians, ok, owned=step.weight_decay != 0)
        us, averages = step.state_shards("u"), step.state_shards("w_avg")
        update_layers(step.shards, jacobians, us, averages, coefficients)
        take = ok.to(dtype)  # E31 for the layers stepped (their grad is not None): theta += u, u *= a
        decay = torch.where(ok, a, torch.ones((), dtype=dtype, device=ok.device))
        predict(step.shards, us, take, decay)

    return update


def _per_tensor_predict(params, us, take, decay) -> None:
    for p, u in zip(params, us):
        p_w, u_w = widen([p, u])
        p_w.addcmul_(u_w, take.to(p.device))
        u_w.mul_(decay.to(p.device))
        write_back([p, u], [p_w, u_w])


def _foreach_predict(params, us, take, decay) -> None:
    for (dev, _), ((p, u), _) in group_by_device_and_dtype([params, us]).items():
        p_w, u_w = widen(p), widen(u)
        torch._foreach_addcmul_(p_w, u_w, [take.to(dev)] * len(p_w))
        torch._foreach_mul_(u_w, decay.to(dev))
        write_back(p, p_w)
        write_back(u, u_w)


@group_by_group_update
def _cpu_update(optimizer: KOALAM, step: GroupStep, coefficients, ok, a: float, dtype) -> None:
    """E33, E34 and E31's predict in one multi-tensor C++ call per dtype; a skipped step writes nothing."""
    kernels = cpu_kernels()
    for lists, indices in group_by_device_and_dtype(step.lists(layouts.KOALA_M)).values():
        kernels.koala_m_update(*lists, coefficients[indices].cpu(), ok.cpu(), a, step.weight_decay)


def _predict_covariance(covariance, qw_avg, distance, shared: dict):
    """E30's running ``qw_avg`` and E32's ``P = F P F^T + diag(qw_avg, qv)``."""
    qw_avg = NOISE_KEEP * qw_avg + NOISE_TAKE * distance
    transition = torch.eye(2, dtype=covariance.dtype, device=covariance.device)  # [[1, 1], [0, a]], built on the device
    transition[0, 1] = 1.0
    transition[1, 1] = shared["a"]
    process_noise = torch.diag(torch.stack([qw_avg, torch.full_like(qw_avg, shared["qv"])]))
    return qw_avg, transition @ covariance @ transition.T + process_noise


def _per_tensor_layers(params, jacobians, us, averages, coefficients) -> None:
    """E33 and E34 one layer at a time: ``theta -= k1 H``, ``u -= k2 H``, ``w_avg = 0.9 w_avg + 0.1 theta`` (masked)."""
    for i, (p, h, u, w) in enumerate(zip(params, jacobians, us, averages)):
        c = layouts.KOALA_M.unstack("coefficients", coefficients[i].to(p.device))
        p_w, h_w, u_w, w_w = widen([p, h, u, w])
        p_w.addcmul_(h_w, c["step_theta"])
        u_w.addcmul_(h_w, c["step_u"])
        w_w.mul_(c["keep_avg"]).addcmul_(p_w, c["take_theta"])
        write_back([p, u, w], [p_w, u_w, w_w])


def _foreach_layers(params, jacobians, us, averages, coefficients) -> None:
    """E33 and E34 with multi-tensor ops, one call per (device, dtype) bucket (masked)."""
    for (device, _), ((p, h, u, w), indices) in group_by_device_and_dtype([params, jacobians, us, averages]).items():
        c = {name: list(column.unbind()) for name, column in
             layouts.KOALA_M.unstack("coefficients", coefficients[indices].to(device)).items()}
        p_w, h_w, u_w, w_w = (widen(t) for t in (p, h, u, w))
        torch._foreach_addcmul_(p_w, h_w, c["step_theta"])
        torch._foreach_addcmul_(u_w, h_w, c["step_u"])
        torch._foreach_mul_(w_w, c["keep_avg"])
        torch._foreach_addcmul_(w_w, p_w, c["take_theta"])
        for originals, copies in ((p, p_w), (u, u_w), (w, w_w)):
            write_back(originals, copies)


def _scalar_list_update(optimizer: KOALAM, step: GroupStep, jacobians, columns: dict[str, list[float]], a: float,
                        dtype) -> None:
    """E33, E34 and E31's predict on torch's fast route, the coefficients as numbers read to the host (off the
    CPU, koala_hf.optim.host_coefficients; the step is ok, so the predict ``theta += u, u *= a`` applies): a
    scaled term is a product into a temporary, then added."""
    lists = [step.shards, jacobians, step.state_shards("u"), step.state_shards("w_avg")]
    for (p, h, u, w), indices in group_by_device_and_dtype(lists).values():
        c = host_coefficients.select(columns, indices, len(jacobians))
        p_w, h_w, u_w, w_w = (widen(t) for t in (p, h, u, w))
        torch._foreach_add_(p_w, torch._foreach_mul(h_w, c["step_theta"]))
        torch._foreach_add_(u_w, torch._foreach_mul(h_w, c["step_u"]))
        torch._foreach_mul_(w_w, c["keep_avg"])
        torch._foreach_add_(w_w, torch._foreach_mul(p_w, c["take_theta"]))
        for originals, copies in ((p, p_w), (u, u_w), (w, w_w)):
            write_back(originals, copies)
        p_w, u_w = widen(p), widen(u)  # E31 from theta and u as stored (rounded where 16-bit, as on every path)
        torch._foreach_add_(p_w, u_w)
        torch._foreach_mul_(u_w, a)
        write_back(p, p_w)
        write_back(u, u_w)


def _triton_update(optimizer: KOALAM, group_steps: list[GroupStep], coefficients, ok, batch, a: float, dtype) -> None:
    """E33, E34 and E31's predict: one launch per dtype for the layers of every group, masked by ``ok``."""
    batch.update("koala_m_update", coefficients, ok, a)


# The passes of each backend (koala_hf.optim.dispatch chooses the backend).
REDUCTIONS = {Backend.PER_TENSOR: eager_reduction(_eager_sums(_per_tensor_distances), foreach=False),
              Backend.FOREACH: eager_reduction(_eager_sums(_foreach_distances), foreach=True),
              Backend.FUSED_CPU: _cpu_sums, Backend.TRITON: _triton_sums}
UPDATES = {Backend.PER_TENSOR: _eager_update(_per_tensor_layers, _per_tensor_predict),
           Backend.FOREACH: foreach_update(layouts.KOALA_M, _eager_update(_foreach_layers, _foreach_predict),
                                           _scalar_list_update),
           Backend.FUSED_CPU: _cpu_update, Backend.TRITON: _triton_update}
