"""KOALA-V: the Kalman optimizer with a scalar shared covariance (spec E20-E22)."""

from __future__ import annotations

from typing import NamedTuple

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
    reduce_by_backend,
    update_by_backend,
)
from koala_hf.optim.jacobian_norms import cpu_norms, eager_norms, triton_norms
from koala_hf.optim.layers import MIN_JACOBIAN_NORM, add_scaled_, finite_mask, group_by_device_and_dtype, widen, write_back
from koala_hf.optim.validation import check_prior


class KOALAV(KoalaOptimizer):
    r"""KOALA-V (Davtyan et al., 2022), spec E20-E22.

    One scalar covariance ``P`` (initially ``sigma``) is shared by every layer:
    ``P_hat = P + q`` (E20); each layer steps
    ``theta -= lr * L_layer * P_hat / s * H`` with ``s = P_hat ||H||^2 + R``
    (E21); then ``P = P_hat - P_hat^2 max_layers(||H||^2 / s)`` (E22). It keeps
    no per-layer state (state dicts from before 0.3 kept each layer's last
    ``||H||^2 / s``, which nothing read; they load, without it).
    ``sigma`` and ``q`` belong to the shared ``P`` and so must be equal in every
    parameter group (they are read from the first); ``lr``, ``weight_decay``,
    ``r`` and ``alpha_r`` may differ. The official training script uses
    ``sigma=0.1, q=1, lr=0.1``.

    ``noise`` chooses the loss-noise measurement (E1a ``"second_moment"``, the
    default; E1b ``"variance"``; E1c ``"none"``), per group, as in
    :class:`KOALAPlusPlus`.

    ``fused=True`` runs the ``||H||^2`` pass and the update without the
    temporary ``H``: on the CPU as one multi-tensor C++ call each for every
    layer of a dtype (koala_hf.optim.cpu_kernels; built on first use), on CUDA
    as three Triton launches per dtype (koala_hf.optim.triton_kernels;
    ``fused="triton"`` asks for them, also on the CPU under ``TRITON_INTERPRET=1``).
    The default ``fused=None`` is the Triton kernels on CUDA and no fused
    backend elsewhere (koala_hf.optim.dispatch).
    """

    layer_state_keys = ()  # none: P is the filter-wide state
    retired_layer_state_keys = ("information",)  # kept per layer before 0.3; dropped when such a state dict loads
    filter_state_keys = ("P",)
    identifying_hyperparameters = ("sigma", "q")
    shared_hyperparameters = ("sigma", "q")

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
        fused: bool | str | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, sigma=sigma, q=q, r=r, alpha_r=alpha_r, noise=noise, weight_decay=weight_decay, foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    def check_group(self, group: dict) -> None:
        super().check_group(group)
        check_prior(group)

    def _init_filter_state(self, options: dict) -> dict:
        return {"P": torch.full((), float(self.shared("sigma")), **options)}  # P_0 = sigma

    def _signals(self, state: dict) -> dict:
        return {"koala/P": state["P"]}

    def _update(self, inputs):
        state = inputs.state
        group_steps = gather(self)
        reduction = reduce_by_backend(self, group_steps, REDUCTIONS, state["R"].device, state["R"].dtype)
        fused = triton_step.fused_scalar_step(self, group_steps, reduction, inputs, "koala_v_coefficients",
                                              {"q": lambda g: g["q"]},
                                              lambda batch: (state["P"],), {})
        if fused is not None:  # every group on the Triton kernels: E1, E2 and E20-E22 ran in one launch
            coefficients, ok = fused
            reduction.plans[Backend.TRITON].update("koala_v_update", [coefficients], ok)
            return ok
        loss, noise_estimates, ok = inputs.measured.loss, inputs.measured.estimates, inputs.measured.ok
        p_hat = state["P"] + self.shared("q")  # E20
        whole, ok = complete_sums(group_steps, reduction.sums, ok, type(self).__name__)

        information, step_sizes = [], []  # ||H||^2 / s of every updated layer, for E22
        for step, sums in zip(group_steps, whole):
            result = koala_v_coefficients(sums, p_hat=p_hat, loss=loss, r_k=noise_estimates[step.index], ok=ok,
                                          lr=step.group["lr"], weight_decay=step.weight_decay)
            information.append(result.information)
            step_sizes.append(result.step_sizes)
        update_by_backend(self, group_steps, UPDATES, [layouts.KOALA_V.stack("coefficients", {"step": step})
                                                       for step in step_sizes], ok, reduction.plans)

        if information:
            p_new = p_hat - p_hat * p_hat * torch.cat(information).max()  # E22
            state["P"] = torch.where(ok, p_new, state["P"])
        return ok


class KoalaVCoefficients(NamedTuple):
    step_sizes: torch.Tensor  # [n]: theta += step_sizes[i] * H (E21), 0 for a layer not updated
    information: torch.Tensor  # [n]: ||H||^2 / s of an updated layer, else 0 (E22's terms)


def koala_v_coefficients(norms, *, p_hat, loss, r_k, ok, lr, weight_decay) -> KoalaVCoefficients:
    """E21 for a batch of layers from their ``[n, 2]`` rows of ``||H||^2`` and ``||theta||^2`` in the layout's
    columns (pure, on the device)."""
    sums = layouts.KOALA_V.unstack("sums", norms)
    hh, theta_sq = sums["hh"], sums["theta_theta"]
    s = p_hat * hh + r_k  # E21
    gain = lr * (loss + 0.5 * weight_decay * theta_sq) * p_hat / s
    update = ok & (hh >= MIN_JACOBIAN_NORM**2) & (s > 0) & torch.isfinite(gain)
    return KoalaVCoefficients(torch.where(update, -gain, 0.0), torch.where(update, hh / s, 0.0))


def _eager_norms(optimizer, step: GroupStep, jacobians, device, dtype, foreach: bool) -> torch.Tensor:
    return layouts.KOALA_V.stack("sums", eager_norms(step, jacobians, device, dtype, foreach))


@group_by_group_sums
def _cpu_norms(optimizer, step: GroupStep, device, dtype) -> torch.Tensor:
    return cpu_norms(step, layouts.KOALA_V, "koala_v_sums", device, dtype)


def _triton_norms(optimizer, group_steps: list[GroupStep], device, dtype):
    return triton_norms(optimizer, group_steps, layouts.KOALA_V, "koala_v_partials", device, dtype)


@eager_update
def _per_tensor_update(optimizer, step: GroupStep, jacobians, coefficients: torch.Tensor, ok: torch.Tensor) -> None:
    """``theta += step * H`` one layer at a time (E21), masked by ``ok``."""
    jacobians = finite_mask(jacobians, ok, owned=step.weight_decay != 0)
    step_sizes = layouts.KOALA_V.unstack("coefficients", coefficients)["step"]
    for p, h, factor in zip(step.shards, jacobians, step_sizes.unbind()):
        p_w, h_w = widen([p, h])
        p_w.addcmul_(h_w, factor.to(p.device))
        write_back([p], [p_w])


@eager_update
def _foreach_update(optimizer, step: GroupStep, jacobians, coefficients: torch.Tensor, ok: torch.Tensor) -> None:
    """``theta += step * H`` with multi-tensor ops, one call per (device, dtype) bucket (E21), masked by ``ok``."""
    jacobians = finite_mask(jacobians, ok, owned=step.weight_decay != 0)
    step_sizes = layouts.KOALA_V.unstack("coefficients", coefficients)["step"]
    for (device, _), ((p, h), indices) in group_by_device_and_dtype([step.shards, jacobians]).items():
        _multi_tensor_layers(p, h, list(step_sizes[indices].to(device).unbind()))


def _scalar_list_update(optimizer, step: GroupStep, jacobians, numbers: list[float]) -> None:
    """``theta += step * H`` (E21) on torch's fast route, the step sizes as numbers read to the host (off the CPU,
    koala_hf.optim.host_coefficients)."""
    for (p, h), indices in group_by_device_and_dtype([step.shards, jacobians]).values():
        _multi_tensor_layers(p, h, host_coefficients.columns(layouts.KOALA_V, numbers, indices)["step"])


def _multi_tensor_layers(p, h, step_sizes: list) -> None:
    """E21 on one bucket's lists, the step sizes as tensors or numbers (:func:`~koala_hf.optim.layers.add_scaled_`)."""
    p_w, h_w = widen(p), widen(h)
    add_scaled_(p_w, h_w, step_sizes)
    write_back(p, p_w)


@group_by_group_update
def _cpu_update(optimizer, step: GroupStep, coefficients: torch.Tensor, ok: torch.Tensor) -> None:
    """One multi-tensor C++ call per dtype; ``H`` recomputed inside, a skipped step writes nothing."""
    kernels = cpu_kernels()
    for lists, indices in group_by_device_and_dtype(step.lists(layouts.KOALA_V)).values():
        kernels.koala_v_update(*lists, coefficients[indices].cpu(), ok.cpu(), step.weight_decay)


def _triton_update(optimizer, group_steps: list[GroupStep], coefficients: list[torch.Tensor], ok: torch.Tensor, batch) -> None:
    """One launch per dtype for the layers of every group, masked by ``ok`` on the device."""
    batch.update("koala_v_update", coefficients, ok)


# The passes of each backend (koala_hf.optim.dispatch chooses the backend).
REDUCTIONS = {Backend.PER_TENSOR: eager_reduction(_eager_norms, foreach=False),
              Backend.FOREACH: eager_reduction(_eager_norms, foreach=True),
              Backend.FUSED_CPU: _cpu_norms, Backend.TRITON: _triton_norms}
UPDATES = {Backend.PER_TENSOR: _per_tensor_update,
           Backend.FOREACH: foreach_update(_foreach_update, _scalar_list_update),
           Backend.FUSED_CPU: _cpu_update, Backend.TRITON: _triton_update}
