"""KOALA-V: the Kalman optimizer with a scalar shared covariance (spec E20-E22)."""

from __future__ import annotations

import torch

from koala_hf.optim.base import MIN_JACOBIAN_NORM, KoalaOptimizer, check_prior
from koala_hf.optim.layers import (
    finite_mask,
    group_by_device_and_dtype,
    reduction_dtype,
    widen,
    write_back,
)


class KOALAV(KoalaOptimizer):
    r"""KOALA-V (Davtyan et al., 2022), spec E20-E22.

    One scalar covariance ``P`` (initially ``sigma``) is shared by every layer:
    ``P_hat = P + q`` (E20); each layer steps
    ``theta -= lr * L_layer * P_hat / s * H`` with ``s = P_hat ||H||^2 + R``
    (E21); then ``P = P_hat - P_hat^2 max_layers(||H||^2 / s)`` (E22). Each
    layer's state keeps its last ``||H||^2 / s`` (``"information"``, the term
    E22 maximises over; 0 when the layer was not updated, unchanged by a
    skipped step).
    ``sigma`` and ``q`` belong to the shared ``P`` and so must be equal in every
    parameter group; ``lr``, ``weight_decay``, ``r`` and ``alpha_r`` may differ.
    The official training script uses ``sigma=0.1, q=1, lr=0.1``.

    ``noise`` chooses the loss-noise measurement (E1a ``"second_moment"``, the
    default; E1b ``"variance"``; E1c ``"none"``), per group, as in
    :class:`KOALAPlusPlus`.

    ``fused=True`` (CPU only) runs the ``||H||^2`` pass and the update as one
    multi-tensor C++ call each for every layer of a dtype, without the
    temporary ``H`` (koala_hf.optim.cpu_kernels; built on first use).
    """

    _shared_hyperparameters = ("sigma", "q")
    # Per layer, the last step's ||H||^2 / s (0 for a layer not updated): the layer's share in E22.
    _float_state_keys = ("information",)

    def __init__(
        self,
        params,
        lr: float = 0.1,
        sigma: float = 0.1,
        q: float = 1.0,
        r: float | None = None,
        alpha_r: float = 0.9,
        noise: str = "second_moment",
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        fused: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, sigma=sigma, q=q, r=r, alpha_r=alpha_r, noise=noise, weight_decay=weight_decay, foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    def check_group(self, group: dict) -> None:
        super().check_group(group)
        if group["fused"]:
            self._refuse_fused_off_cpu(group["params"])
        check_prior(group)

    def _init_global_state(self, options: dict) -> dict:
        return {"P": torch.full((), float(self.defaults["sigma"]), **options)}

    def _signals(self, state: dict) -> dict:
        return {"koala/P": state["P"]}

    def _layer_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["information"] = torch.zeros((), dtype=reduction_dtype(p.dtype), device=p.device)
        return state

    def _update(self, loss, noise, ok):
        state = self.global_state()
        device, dtype = loss.device, loss.dtype
        p_hat = state["P"] + self.param_groups[0]["q"]  # E20
        measured, ok = self._jacobian_norms(ok, device, dtype)

        information = []  # ||H||^2 / s of every updated layer, for E22
        for index, group, stepped, params, jacobians, norms, foreach, kernels in measured:
            hh, theta_sq = norms.unbind(-1)
            s = p_hat * hh + noise[index]  # E21
            gain = group["lr"] * (loss + 0.5 * group["weight_decay"] * theta_sq) * p_hat / s
            update = ok & (hh >= MIN_JACOBIAN_NORM**2) & (s > 0) & torch.isfinite(gain)
            information.append(torch.where(update, hh / s, 0.0))
            layers = [self._layer_state(p) for p in stepped]
            previous = torch.stack([layer["information"] for layer in layers]).to(device, dtype)
            for layer, value in zip(layers, torch.where(ok, information[-1], previous).unbind()):
                layer["information"] = value  # a skipped step keeps the last one
            steps = torch.where(update, -gain, 0.0)
            if kernels is not None:  # H recomputed inside; a skipped step writes nothing
                for (p, g), indices in group_by_device_and_dtype([params, jacobians]).values():
                    kernels.koala_v_update(p, g, steps[indices].cpu(), ok.cpu(), group["weight_decay"])
                continue
            jacobians = finite_mask(jacobians, ok, owned=group["weight_decay"] != 0)
            _apply(params, jacobians, steps, foreach)

        if information:
            p_new = p_hat - p_hat * p_hat * torch.cat(information).max()  # E22
            state["P"] = torch.where(ok, p_new, state["P"])
        return ok


def _apply(params, jacobians, steps, foreach: bool) -> None:
    """``theta += step * H`` per layer (E21), per tensor or with multi-tensor ops."""
    if not foreach:
        for p, h, step in zip(params, jacobians, steps.unbind()):
            p_w, h_w = widen([p, h])
            p_w.addcmul_(h_w, step.to(p.device))
            write_back([p], [p_w])
        return
    for (device, _), ((p, h), indices) in group_by_device_and_dtype([params, jacobians]).items():
        p_w, h_w = widen(p), widen(h)
        torch._foreach_addcmul_(p_w, h_w, list(steps[indices].to(device).unbind()))
        write_back(p, p_w)
