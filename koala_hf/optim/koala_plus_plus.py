"""KOALA++: Kalman filtering with gradient-covariance products (spec E10-E17).

Per layer the filter keeps ``v = H P`` (the gradient-covariance product),
``H_prev`` and, in the ``filter`` vector, last step's innovation variance
``S_prev``, ``H_prev . H_prev`` and ``H_prev . v_prev`` (carried instead of
recomputed, spec cost notes). A step is one reduction pass (``H.H``,
``H.H_prev``, ``H.v_prev`` and, with weight decay, ``theta.theta``) and one
elementwise pass; the scalar algebra in between runs on all layers of a group at
once, on the device.
"""

from __future__ import annotations

import torch

from koala_hf.optim.base import MIN_JACOBIAN_NORM, KoalaOptimizer, check_range
from koala_hf.optim.layers import (
    dot,
    finite_mask,
    group_by_device_and_dtype,
    measurement_jacobians,
    reduction_dtype,
    widen,
    write_back,
)

# Columns of the per-layer ``filter`` state.
S_PREV, HH_PREV, VH_PREV, READY = range(4)
# Columns of the elementwise coefficients: v <- C_V v + C_H H + C_HP H_prev;
# theta <- theta + STEP_V v + STEP_H H; H_prev <- KEEP_HP H_prev + TAKE_H H.
C_V, C_H, C_HP, STEP_V, STEP_H, KEEP_HP, TAKE_H = range(7)


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
        weight_decay: L2 regularisation folded into the measured loss (E3).
        symmetric: the symmetric least-squares covariance estimate (KOALA++);
            ``False`` gives the vanilla estimate, KOALA++ (NS) (E13).
        foreach: use the multi-tensor path (default: on CUDA).

    Call :meth:`observe` with the loss before :meth:`step`, or use
    :class:`koala_hf.KoalaTrainer`. A layer whose innovation variance ``S`` is
    not a positive finite number is left unchanged and restarts from E10 at its
    next step; a step with a non-finite loss or gradient changes nothing but the
    ``skipped_steps`` counter.
    """

    _float_state_keys = ("filter",)

    def __init__(
        self,
        params,
        lr: float = 1.0,
        sigma: float = 0.1,
        q: float = 0.1,
        r: float | None = None,
        alpha_r: float = 0.9,
        weight_decay: float = 0.0,
        symmetric: bool = True,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, sigma=sigma, q=q, r=r, alpha_r=alpha_r, weight_decay=weight_decay,
            symmetric=symmetric, foreach=foreach,
        )
        super().__init__(params, defaults)

    def check_group(self, group: dict) -> None:
        super().check_group(group)
        check_range("sigma", group["sigma"], 0.0, low_open=True)
        check_range("q", group["q"], 0.0)

    def _layer_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["H_prev"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["filter"] = torch.zeros(4, dtype=reduction_dtype(p.dtype), device=p.device)
        return state

    def _signals(self, state: dict) -> dict:
        """Innovation variance ``S`` (E15) and effective step size ``lr L / S`` (E16), averaged over layers."""
        variances, steps = [], []
        for group in self.param_groups:
            for p in group["params"]:
                filt = self.state.get(p, {}).get("filter")
                if filt is not None:
                    s = filt[S_PREV].to(state["loss"].device, state["loss"].dtype)
                    variances.append(s)
                    steps.append(group["lr"] * state["loss"] / s)
        if not variances:
            return {}
        return {"koala/innovation_variance": torch.stack(variances).mean(), "koala/effective_step": torch.stack(steps).mean()}

    def _update(self, loss, noise, ok):
        device, dtype = loss.device, loss.dtype
        measured = []
        for index, group in enumerate(self.param_groups):
            params, grads = self._params_with_grad(group)
            if not params:
                continue
            states = [self._layer_state(p) for p in params]
            foreach = self._foreach(group, params)
            jacobians = measurement_jacobians(params, grads, group["weight_decay"], foreach)
            products = torch.stack(
                [
                    layer_products(p, h, s["H_prev"], s["v"], group["weight_decay"]).to(device, dtype)
                    for p, h, s in zip(params, jacobians, states)
                ]
            )
            ok = ok & torch.isfinite(products).all()
            measured.append((index, group, params, jacobians, states, products, foreach))

        for index, group, params, jacobians, states, products, foreach in measured:
            filters = [s["filter"] for s in states]
            coefficients, new_filters = kalman_coefficients(
                products,
                torch.stack([f.to(device, dtype) for f in filters]),
                loss=loss, noise=noise[index], ok=ok, lr=group["lr"], sigma=group["sigma"], q=group["q"],
                weight_decay=group["weight_decay"], symmetric=group["symmetric"],
            )
            owned = group["weight_decay"] != 0
            jacobians = finite_mask(jacobians, ok, owned)
            update = _foreach_update if foreach else _single_tensor_update
            update(params, jacobians, [s["v"] for s in states], [s["H_prev"] for s in states], coefficients)
            for f, new in zip(filters, new_filters.unbind(0)):
                f.copy_(new)
        return ok


def layer_products(p, h, h_prev, v_prev, weight_decay: float) -> torch.Tensor:
    """``[H.H, H.H_prev, H.v_prev, theta.theta]`` of one layer in float32 or wider (E11-E13, E3)."""
    dtype = reduction_dtype(p.dtype)
    flat = h.reshape(-1).to(dtype)
    theta_sq = dot(p, p, dtype) if weight_decay != 0 else torch.zeros((), dtype=dtype, device=p.device)
    return torch.stack([torch.dot(flat, flat), dot(flat, h_prev, dtype), dot(flat, v_prev, dtype), theta_sq])


def kalman_coefficients(products, filters, *, loss, noise, ok, lr, sigma, q, weight_decay, symmetric):
    """The scalar algebra of E10-E17 for a batch of layers.

    ``products``: ``[n, 4]`` rows of :func:`layer_products`; ``filters``:
    ``[n, 4]`` rows of ``S_prev, H_prev.H_prev, H_prev.v_prev, ready``. Returns
    the ``[n, 7]`` elementwise coefficients (columns ``C_V ... TAKE_H``, masked
    so that a layer not updated keeps its state) and the new ``filters``.
    """
    hh, a, b, theta_sq = products.unbind(-1)
    s_prev, x, y, ready = filters.unbind(-1)
    ready = ready > 0
    # E10: a layer without history starts from v_prev = sigma H, H_prev = H.
    s_prev = torch.where(ready, s_prev, (sigma + q) * hh + noise)
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
    s = vh + q * hh + noise  # E15
    gain = lr * (loss + 0.5 * weight_decay * theta_sq) / s  # E16: theta -= gain (v + q H)

    measured = hh >= MIN_JACOBIAN_NORM**2
    stable = (s > 0) & torch.isfinite(torch.stack([s, gain, c_v, c_h, c_hp])).all(0)
    update = ok & measured & stable
    keep = (~(ok & measured & ~stable)).to(s.dtype)  # an unstable layer restarts from E10
    zero = torch.zeros_like(s)
    coefficients = torch.stack(
        [
            torch.where(update, c_v, keep),
            torch.where(update, c_h, zero),
            torch.where(update, c_hp, zero),
            torch.where(update, -gain, zero),
            torch.where(update, -gain * q, zero),
            torch.where(update, zero, keep),
            update.to(s.dtype),
        ],
        dim=-1,
    )
    new_filters = torch.where(
        update.unsqueeze(-1),
        torch.stack([s, hh, vh, torch.ones_like(s)], dim=-1),  # E17
        filters * keep.unsqueeze(-1),
    )
    return coefficients, new_filters


def _single_tensor_update(params, jacobians, vs, h_prevs, coefficients):
    """E14, E16, E17 one layer at a time."""
    for i, (p, h, v, h_prev) in enumerate(zip(params, jacobians, vs, h_prevs)):
        c = coefficients[i].to(p.device).unbind()
        p_w, h_w, v_w, hp_w = widen([p, h, v, h_prev])
        v_w.mul_(c[C_V]).addcmul_(h_w, c[C_H]).addcmul_(hp_w, c[C_HP])
        p_w.addcmul_(v_w, c[STEP_V]).addcmul_(h_w, c[STEP_H])
        hp_w.mul_(c[KEEP_HP]).addcmul_(h_w, c[TAKE_H])
        write_back([p, v, h_prev], [p_w, v_w, hp_w])


def _foreach_update(params, jacobians, vs, h_prevs, coefficients):
    """E14, E16, E17 with multi-tensor ops, one call per (device, dtype) bucket."""
    buckets = group_by_device_and_dtype([params, jacobians, vs, h_prevs])
    for (device, _), ((p, h, v, h_prev), indices) in buckets.items():
        c = [list(column.unbind()) for column in coefficients[indices].to(device).T]
        p_w, h_w, v_w, hp_w = (widen(t) for t in (p, h, v, h_prev))
        torch._foreach_mul_(v_w, c[C_V])
        torch._foreach_addcmul_(v_w, h_w, c[C_H])
        torch._foreach_addcmul_(v_w, hp_w, c[C_HP])
        torch._foreach_addcmul_(p_w, v_w, c[STEP_V])
        torch._foreach_addcmul_(p_w, h_w, c[STEP_H])
        torch._foreach_mul_(hp_w, c[KEEP_HP])
        torch._foreach_addcmul_(hp_w, h_w, c[TAKE_H])
        for originals, copies in ((p, p_w), (v, v_w), (h_prev, hp_w)):
            write_back(originals, copies)
