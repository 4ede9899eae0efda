"""KOALA++: Kalman filtering with gradient-covariance products (spec E10-E17).

Per layer the filter keeps ``v = H P`` (the gradient-covariance product),
``H_prev`` and, in the ``filter`` vector, last step's innovation variance
``S_prev``, ``H_prev . H_prev`` and ``H_prev . v_prev`` (carried instead of
recomputed, spec cost notes). A step is one reduction pass (``H.H``,
``H.H_prev``, ``H.v_prev`` and, with weight decay, ``theta.theta``, in
float32 or wider), the scalar algebra on all layers of a group at once
(:func:`kalman_coefficients`), and one elementwise pass (E14, E16, E17). Each
pass has a per-tensor, a foreach, a C++ (CPU) and a Triton implementation; the
group's backend (koala_hf.optim.dispatch) picks one (``REDUCTIONS`` and
``UPDATES``). Their tensor lists, sums and coefficients are in the columns of
``layouts.KOALA_PLUS_PLUS``.
Under FSDP2 the reduction runs on this process's shards and one collective sums
every layer's products (koala_hf.optim.sharding).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from koala_hf.optim import host_coefficients, layouts, triton_step
from koala_hf.optim.base import KoalaOptimizer
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
    Prepared,
    reduce_by_backend,
    update_by_backend,
)
from koala_hf.optim.layers import (
    MIN_JACOBIAN_NORM,
    add_scaled_,
    blend_,
    bucketed_rows,
    dots,
    finite_mask,
    group_by_device_and_dtype,
    reduction_dtype,
    skipped_on_host,
    widen,
    write_back,
)
from koala_hf.optim.validation import check_prior

# Columns of the per-layer ``filter`` state (saved in checkpoints: this order is their format).
S_PREV, HH_PREV, VH_PREV, READY = range(4)


class KOALAPlusPlus(KoalaOptimizer):
    r"""KOALA++ (Xia, Davtyan, Favaro, 2025), spec E10-E17.

    Args:
        params: parameters or parameter groups.
        lr: scales every update (E4; what LR schedulers change). Paper: 1.0 on
            CIFAR-10, 2.0 on CIFAR-100, 2e-3 for the WikiText-2 GPT.
        sigma: initial uncertainty, ``P_0 = sigma I`` (E10).
        q: process noise, ``Q = q I``.
        r: fixed measurement-noise variance; ``None`` estimates it (E2).
        alpha_r: running-average factor of the noise estimate (E2).
        noise: what measures the loss noise ``m_k`` (E1a-E1c): ``"second_moment"``
            ``mean(l_i^2)`` (the KOALA paper's, default), ``"variance"``
            ``mean(l_i^2) - L^2``, or ``"none"`` (0: ``R`` fades from ``R_0 = 1``
            to about 0, what the papers' language-model run did). A fixed ``r``
            overrides it.
        weight_decay: L2 regularisation folded into the measured loss (E3).
        symmetric: the symmetric least-squares covariance estimate (KOALA++);
            ``False`` gives the vanilla estimate, KOALA++ (NS) (E13).
        foreach: use the multi-tensor path (default: on CUDA). Off the CPU it
            copies the layers' coefficients to the host once per step (one
            synchronisation) so that torch runs each op as one launch for all
            layers (koala_hf.optim.host_coefficients).
        fused: run the step as two fused passes over the tensors, the reduction
            (E11-E13) and the update (E14-E17), without the temporary ``H``: the
            fewest tensor passes a step can make (11). ``True``: the device's
            fused backend. On the CPU each pass is one call of a multi-tensor C++
            kernel for every layer of a dtype (koala_hf.optim.cpu_kernels: built
            on first use, 10-16 s, then cached); on CUDA three Triton launches
            per dtype for every layer (koala_hf.optim.triton_kernels and
            triton_step).
            ``"triton"``: the Triton kernels, also on the CPU under
            ``TRITON_INTERPRET=1`` (Triton's interpreter: for tests).
            ``None`` (default): the Triton kernels on CUDA (the foreach path,
            said once, where Triton cannot run, or with ``foreach=True``),
            no fused backend elsewhere. ``False``: none.

    Call :meth:`observe` with the loss before :meth:`step`, or use
    :class:`koala_hf.KoalaTrainer`. A layer whose innovation variance ``S`` is
    not a positive finite number is left unchanged and restarts from E10 at its
    next step; a step with a non-finite loss or gradient changes nothing but the
    ``skipped_steps`` counter.
    """

    layer_state_keys = ("v", "H_prev", "filter")
    layer_scalar_keys = ("filter",)
    identifying_hyperparameters = ("sigma", "q", "symmetric")

    def __init__(
        self,
        params,
        lr: float = 1.0,
        sigma: float = 0.1,
        q: float = 0.1,
        r: float | None = None,
        alpha_r: float = 0.9,
        noise: str = "second_moment",
        weight_decay: float = 0.0,
        symmetric: bool = True,
        foreach: bool | None = None,
        fused: bool | str | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, sigma=sigma, q=q, r=r, alpha_r=alpha_r, noise=noise, weight_decay=weight_decay,
            symmetric=symmetric, foreach=foreach, fused=fused,
        )
        super().__init__(params, defaults)

    def check_group(self, group: dict) -> None:
        super().check_group(group)
        check_prior(group)

    def _layer_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["H_prev"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["filter"] = torch.zeros(4, dtype=reduction_dtype(p.dtype), device=p.device)
        return state

    def _signals(self, state: dict) -> dict:
        """Innovation variance ``S`` (E15), effective step size ``lr L / S`` (E16) with the lr the step applied,
        and the noise share ``R / S`` (how much of ``S`` the loss-noise estimate makes: near 1, the step is SGD's
        with step ``lr L / R``), averaged over the layers that have taken a step (a layer with an all-zero
        gradient has ``S = 0`` and takes none)."""
        variances, rates, noises = [], [], []
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                filt = self.state.get(p, {}).get("filter")
                if filt is not None:
                    variances.append(torch.where(filt[READY] > 0, filt[S_PREV], 0.0).to(state["loss"].device, state["loss"].dtype))
                    rates.append(float(self.applied_lr(index)))
                    noises.append(state["R"][index])
        if not variances:
            return {}
        s = torch.stack(variances)
        stepped = (s > 0) & torch.isfinite(s)
        count = stepped.sum()
        if count.item() == 0:  # diagnostics() reads values back anyway
            return {}
        lr = torch.tensor(rates, dtype=s.dtype, device=s.device)
        safe = torch.where(stepped, s, 1.0)
        effective = torch.where(stepped, lr * state["loss"] / safe, 0.0)
        shares = torch.where(stepped, torch.stack(noises).to(s.dtype) / safe, 0.0)
        return {"koala/innovation_variance": torch.where(stepped, s, 0.0).sum() / count,
                "koala/effective_step": effective.sum() / count, "koala/noise_share": shares.sum() / count}

    def _sgd_step_scale(self) -> float:
        """With ``S ~ R``, E16 is an SGD step of ``lr * L / R`` times ``v + q H ~ (sigma + q) H``."""
        group = self.param_groups[0]
        return float(group["sigma"]) + float(group["q"])

    def _update(self, inputs):
        group_steps = gather(self)
        scalars = inputs.state["R"]  # the step's arithmetic: the state's device and dtype
        reduction = reduce_by_backend(self, group_steps, REDUCTIONS, scalars.device, scalars.dtype)
        fused = _triton_scalar_step(self, group_steps, reduction, inputs)
        if fused is not None:  # every group on the Triton kernels: E1, E2 and E10-E17 ran in one launch
            coefficients, ok = fused
            reduction.plans[Backend.TRITON].update("koala_plus_plus_update", [coefficients], ok)
            return ok
        loss, noise_estimates, ok = inputs.measured.loss, inputs.measured.estimates, inputs.measured.ok
        whole, ok = complete_sums(group_steps, reduction.sums, ok, type(self).__name__)  # whole layers': one collective under FSDP2
        coefficients, filters = [], []
        for step, sums in zip(group_steps, whole):
            group = step.group
            layer_filters = [state["filter"] for state in step.states]  # per-layer scalars, never sharded
            result = kalman_coefficients(
                sums, torch.stack(layer_filters).to(loss.device, loss.dtype),
                loss=loss, r_k=noise_estimates[step.index], ok=ok, lr=group["lr"], sigma=group["sigma"], q=group["q"],
                weight_decay=group["weight_decay"], symmetric=group["symmetric"],
            )
            coefficients.append(result.coefficients)
            filters.append((layer_filters, result.filters))
        update_by_backend(self, group_steps, UPDATES, coefficients, ok, reduction.plans)
        for layer_filters, new_filters in filters:
            torch._foreach_copy_(layer_filters, list(new_filters.unbind(0)))
        return ok


class KalmanCoefficients(NamedTuple):
    coefficients: torch.Tensor  # [n, 7], in the layout's columns of coefficients
    filters: torch.Tensor  # [n, 4], the layers' new filter state


def kalman_coefficients(products, filters, *, loss, r_k, ok, lr, sigma, q, weight_decay, symmetric) -> KalmanCoefficients:
    """The scalar algebra of E10-E17 for a batch of layers (pure: tensors in, tensors out, on the device).

    ``products``: ``[n, 4]`` rows of ``H.H``, ``H.H_prev``, ``H.v_prev`` and
    ``theta.theta`` (E11-E13, E3) in the layout's columns of sums; ``filters``:
    ``[n, 4]`` rows of ``S_prev, H_prev.H_prev, H_prev.v_prev, ready``. Returns
    the ``[n, 7]`` elementwise coefficients of ``v <- c_v v + c_h H + c_hp H_prev``,
    ``theta <- theta + step_v v + step_h H`` and ``H_prev <- keep_hp H_prev + take_h H``
    (masked so that a layer not updated keeps its state) and the new ``filters``.
    """
    sums = layouts.KOALA_PLUS_PLUS.unstack("sums", products)
    hh, a, b, theta_sq = sums["hh"], sums["h_hprev"], sums["h_v"], sums["theta_theta"]
    s_prev, x, y, ready = filters.unbind(-1)
    ready = ready > 0
    # E10: a layer without history starts from v_prev = sigma H, H_prev = H.
    s_prev = torch.where(ready, s_prev, (sigma + q) * hh + r_k)
    x = torch.where(ready, x, hh)
    y = torch.where(ready, y, sigma * hh)
    a = torch.where(ready, a, hh)
    b = torch.where(ready, b, sigma * hh)

    lam = (b + q * a) / s_prev  # E11
    alpha = a / x  # E12
    rho = b / x - a * y / (x * x) if symmetric else torch.zeros_like(a)  # E13
    # E14: v = (alpha - lam) v_prev + q (H - lam H_prev) + rho H_prev
    c_v = alpha - lam
    c_hp = rho - q * lam
    c_h = torch.where(ready, q, sigma * c_v + q + c_hp)  # E10's v_prev, H_prev are multiples of H
    c_v = torch.where(ready, c_v, 0.0)
    c_hp = torch.where(ready, c_hp, 0.0)

    vh = c_v * b + c_h * hh + c_hp * a  # v . H without another pass (cost notes)
    s = vh + q * hh + r_k  # E15
    gain = lr * (loss + 0.5 * weight_decay * theta_sq) / s  # E16: theta -= gain (v + q H)

    measured = hh >= MIN_JACOBIAN_NORM**2
    stable = (s > 0) & torch.isfinite(torch.stack([s, gain, c_v, c_h, c_hp])).all(0)
    update = ok & measured & stable
    keep = (~(ok & measured & ~stable)).to(s.dtype)  # an unstable layer restarts from E10
    zero = torch.zeros_like(s)
    coefficients = layouts.KOALA_PLUS_PLUS.stack("coefficients", {
        "c_v": torch.where(update, c_v, keep),
        "c_h": torch.where(update, c_h, zero),
        "c_hp": torch.where(update, c_hp, zero),
        "step_v": torch.where(update, -gain, zero),
        "step_h": torch.where(update, -gain * q, zero),
        "keep_hp": torch.where(update, zero, keep),
        "take_h": update.to(s.dtype),
    })
    new_filters = torch.where(
        update.unsqueeze(-1),
        torch.stack([s, hh, vh, torch.ones_like(s)], dim=-1),  # E17
        filters * keep.unsqueeze(-1),
    )
    return KalmanCoefficients(coefficients, new_filters)


# --------------------------------------------------------------- reduction pass
def _eager_products(optimizer, step: GroupStep, jacobians, device, dtype, foreach: bool) -> torch.Tensor:
    """``[n_layers, 4]`` sums (E11-E13, E3) from the formed ``H``, each layer's in float32 or wider, a column at a
    time: one ``dot`` per layer, or multi-tensor sums on the foreach path (:func:`~koala_hf.optim.layers.dots`)."""
    column = lambda others: dots(jacobians, others, None, foreach, device)  # noqa: E731
    theta_sq = (dots(step.shards, None, None, foreach, device) if step.weight_decay != 0
                else torch.zeros(len(jacobians), dtype=dtype, device=device))
    return layouts.KOALA_PLUS_PLUS.stack("sums", {"hh": column(None), "h_hprev": column(step.state_shards("H_prev")),
                                                  "h_v": column(step.state_shards("v")), "theta_theta": theta_sq})


@group_by_group_sums
def _cpu_products(optimizer, step: GroupStep, device, dtype) -> torch.Tensor:
    """One call of the multi-tensor C++ kernel per dtype for all layers (koala_hf.optim.cpu_kernels)."""
    kernels = cpu_kernels()
    return bucketed_rows(step.lists(layouts.KOALA_PLUS_PLUS),
                         lambda *lists: kernels.koala_plus_plus_products(*lists, step.weight_decay))


def _triton_products(optimizer, group_steps: list[GroupStep], device, dtype) -> Prepared:
    """A reduction and a combination launch per dtype for the layers of every group (koala_hf.optim.triton_kernels);
    the batch (address tables, copies) is the plan the update uses."""
    layout = layouts.KOALA_PLUS_PLUS
    batch = optimizer._triton_batches.get(layout, group_steps, optimizer._triton_chunk_plans)
    return Prepared(batch.sums("koala_plus_plus_partials", device, dtype), batch)


# KOALA++'s own columns of the scalar kernel's hyperparameters (triton_step.fused_scalar_step), computed as
# kalman_coefficients computes them, and where its per-layer filter keeps what.
HYPERPARAMETERS = {"sigma": lambda g: g["sigma"], "q": lambda g: g["q"], "sigma_plus_q": lambda g: g["sigma"] + g["q"],
                   "symmetric": lambda g: float(g["symmetric"])}
FILTER_COLUMNS = {"FILTER_S_PREV": S_PREV, "FILTER_HH_PREV": HH_PREV, "FILTER_VH_PREV": VH_PREV, "FILTER_READY": READY}


def _triton_scalar_step(optimizer, group_steps: list[GroupStep], reduction, inputs):
    """E1, E2 and E10-E17 in one launch (triton_scalar_kernels.koala_plus_plus_coefficients), each layer's filter
    state read and written through a table of addresses; ``None`` where torch must compute them."""
    return triton_step.fused_scalar_step(
        optimizer, group_steps, reduction, inputs, "koala_plus_plus_coefficients", HYPERPARAMETERS, lambda batch: (),
        FILTER_COLUMNS, lambda: [state["filter"] for step in group_steps for state in step.states])


# ------------------------------------------------------------------ update pass
def _eager_update(layers_update: Callable) -> Callable:
    """The update pass of an eager backend: E14, E16, E17 on the formed ``H`` by ``layers_update`` (one layer at a
    time, or multi-tensor), skipped where ``ok`` reads back for free, else masked."""

    @eager_update
    def update(optimizer, step: GroupStep, jacobians, coefficients: torch.Tensor, ok: torch.Tensor) -> None:
        if skipped_on_host(ok):
            return
        jacobians = finite_mask(jacobians, ok, owned=step.weight_decay != 0)
        layers_update(step.shards, jacobians, step.state_shards("v"), step.state_shards("H_prev"), coefficients)

    return update


@group_by_group_update
def _cpu_update(optimizer, step: GroupStep, coefficients: torch.Tensor, ok: torch.Tensor) -> None:
    """One multi-tensor C++ call per dtype; ``H`` is recomputed inside and a skipped step writes nothing."""
    kernels = cpu_kernels()
    for lists, indices in group_by_device_and_dtype(step.lists(layouts.KOALA_PLUS_PLUS)).values():
        kernels.koala_plus_plus_update(*lists, coefficients[indices].cpu(), ok.cpu(), step.weight_decay)


def _triton_update(optimizer, group_steps: list[GroupStep], coefficients: list[torch.Tensor], ok: torch.Tensor, batch) -> None:
    """One launch per dtype for the layers of every group, masked by ``ok`` on the device."""
    batch.update("koala_plus_plus_update", coefficients, ok)


def _single_tensor_update(params, jacobians, vs, h_prevs, coefficients):
    """E14, E16, E17 one layer at a time."""
    for i, (p, h, v, h_prev) in enumerate(zip(params, jacobians, vs, h_prevs)):
        c = layouts.KOALA_PLUS_PLUS.unstack("coefficients", coefficients[i].to(p.device))
        p_w, h_w, v_w, hp_w = widen([p, h, v, h_prev])
        v_w.mul_(c["c_v"]).addcmul_(h_w, c["c_h"]).addcmul_(hp_w, c["c_hp"])
        p_w.addcmul_(v_w, c["step_v"]).addcmul_(h_w, c["step_h"])
        hp_w.mul_(c["keep_hp"]).addcmul_(h_w, c["take_h"])
        write_back([p, v, h_prev], [p_w, v_w, hp_w])


def _foreach_update(params, jacobians, vs, h_prevs, coefficients):
    """E14, E16, E17 with multi-tensor ops, one call per (device, dtype) bucket, the coefficients as tensors."""
    buckets = group_by_device_and_dtype([params, jacobians, vs, h_prevs])
    for (device, _), (lists, indices) in buckets.items():
        columns = layouts.KOALA_PLUS_PLUS.unstack("coefficients", coefficients[indices].to(device))
        _multi_tensor_layers(*lists, {name: list(column.unbind()) for name, column in columns.items()})


def _scalar_list_update(optimizer, step: GroupStep, jacobians, numbers: list[float]) -> None:
    """E14, E16, E17 with multi-tensor ops on torch's fast route, the coefficients as numbers read to the host
    (off the CPU, koala_hf.optim.host_coefficients)."""
    layers = [step.shards, jacobians, step.state_shards("v"), step.state_shards("H_prev")]
    for lists, indices in group_by_device_and_dtype(layers).values():
        _multi_tensor_layers(*lists, host_coefficients.columns(layouts.KOALA_PLUS_PLUS, numbers, indices))


def _multi_tensor_layers(p, h, v, h_prev, c: dict[str, list]) -> None:
    """E14, E16, E17 on one bucket's lists, ``c`` the columns of coefficients as tensors or numbers
    (:func:`~koala_hf.optim.layers.add_scaled_`)."""
    p_w, h_w, v_w, hp_w = (widen(t) for t in (p, h, v, h_prev))
    torch._foreach_mul_(v_w, c["c_v"])
    add_scaled_(v_w, h_w, c["c_h"])
    add_scaled_(v_w, hp_w, c["c_hp"])
    add_scaled_(p_w, v_w, c["step_v"])
    add_scaled_(p_w, h_w, c["step_h"])
    blend_(hp_w, h_w, c["keep_hp"], c["take_h"])
    for originals, copies in ((p, p_w), (v, v_w), (h_prev, hp_w)):
        write_back(originals, copies)


# The passes of each backend (koala_hf.optim.dispatch chooses the backend).
REDUCTIONS = {Backend.PER_TENSOR: eager_reduction(_eager_products, foreach=False),
              Backend.FOREACH: eager_reduction(_eager_products, foreach=True),
              Backend.FUSED_CPU: _cpu_products, Backend.TRITON: _triton_products}
UPDATES = {Backend.PER_TENSOR: _eager_update(_single_tensor_update),
           Backend.FOREACH: foreach_update(_eager_update(_foreach_update), _scalar_list_update),
           Backend.FUSED_CPU: _cpu_update, Backend.TRITON: _triton_update}
