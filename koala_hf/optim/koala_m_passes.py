"""KOALA-M's two passes on every backend (koala_hf.optim.dispatch chooses one per group): the reduction of
``||H||^2``, ``||theta||^2``, ``d.d`` and ``d.H`` per layer (E33, E30's distance), and the update that applies
E33-E34's coefficients and E31's predict (``theta += u, u *= a``). Per-tensor, foreach (with the coefficients
on the host off the CPU, koala_hf.optim.host_coefficients), the C++ kernels and the Triton kernels; their
tensor lists and columns are those of ``layouts.KOALA_M``. The optimizer and its scalar algebra are in
koala_hf.optim.koala_m.
"""

from __future__ import annotations

from typing import Callable

import torch

from koala_hf.optim import host_coefficients, layouts
from koala_hf.optim.cpu_kernels import cpu_kernels
from koala_hf.optim.dispatch import Backend
from koala_hf.optim.group_step import (
    GroupStep,
    eager_reduction,
    eager_update,
    foreach_update,
    group_by_group_sums,
    group_by_group_update,
)
from koala_hf.optim.jacobian_norms import cpu_norms, eager_norms, triton_norms
from koala_hf.optim.layers import add_scaled_, dots, finite_mask, group_by_device_and_dtype, widen, write_back


def _eager_sums(distances_of: Callable) -> Callable:
    """The per-group reduction of an eager backend: ``||H||^2``, ``||theta||^2``, ``d.d`` and ``d.H`` per layer from
    the formed ``H``, with ``d = w_avg - theta`` before the update (E30's distance, see
    :func:`koala_hf.optim.koala_m.koala_m_coefficients`) from ``distances_of(optimizer, step, dtype)``."""

    def sums(optimizer, step: GroupStep, jacobians, device, dtype, foreach: bool) -> torch.Tensor:
        distances = distances_of(optimizer, step, dtype)
        columns = eager_norms(step, jacobians, device, dtype, foreach)
        columns["dd"] = dots(distances, None, dtype, foreach, device)
        columns["dh"] = dots(distances, jacobians, dtype, foreach, device)
        return layouts.KOALA_M.stack("sums", columns)

    return sums


def _per_tensor_distances(optimizer, step: GroupStep, dtype) -> list[torch.Tensor]:
    """``d = w_avg - theta`` per layer, never in 16 bits."""
    return [w.to(dtype) - theta.to(dtype) for w, theta in zip(step.state_shards("w_avg"), step.shards)]


def _foreach_distances(optimizer, step: GroupStep, dtype) -> list[torch.Tensor]:
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
def _cpu_sums(optimizer, step: GroupStep, device, dtype) -> torch.Tensor:
    return cpu_norms(step, layouts.KOALA_M, "koala_m_sums", device, dtype)


def _triton_sums(optimizer, group_steps: list[GroupStep], device, dtype):
    return triton_norms(optimizer, group_steps, layouts.KOALA_M, "koala_m_partials", device, dtype)


def _eager_update(update_layers: Callable, predict: Callable) -> Callable:
    """The update pass of an eager backend: E33, E34 (``update_layers``), then E31's predict (``predict``), on the
    formed ``H``, masked by ``ok``."""

    @eager_update
    def update(optimizer, step: GroupStep, jacobians, coefficients, ok, a: float, dtype) -> None:
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
def _cpu_update(optimizer, step: GroupStep, coefficients, ok, a: float, dtype) -> None:
    """E33, E34 and E31's predict in one multi-tensor C++ call per dtype; a skipped step writes nothing."""
    kernels = cpu_kernels()
    for lists, indices in group_by_device_and_dtype(step.lists(layouts.KOALA_M)).values():
        kernels.koala_m_update(*lists, coefficients[indices].cpu(), ok.cpu(), a, step.weight_decay)


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
    """E33 and E34 with multi-tensor ops, one call per (device, dtype) bucket, the coefficients as tensors (masked)."""
    for (device, _), (lists, indices) in group_by_device_and_dtype([params, jacobians, us, averages]).items():
        columns = layouts.KOALA_M.unstack("coefficients", coefficients[indices].to(device))
        _multi_tensor_layers(*lists, {name: list(column.unbind()) for name, column in columns.items()})


def _scalar_list_update(optimizer, step: GroupStep, jacobians, numbers: list[float], a: float,
                        dtype) -> None:
    """E33, E34 and E31's predict on torch's fast route, the coefficients as numbers read to the host (off the
    CPU, koala_hf.optim.host_coefficients; the step is ok, so the predict ``theta += u, u *= a`` applies)."""
    lists = [step.shards, jacobians, step.state_shards("u"), step.state_shards("w_avg")]
    for (p, h, u, w), indices in group_by_device_and_dtype(lists).values():
        _multi_tensor_layers(p, h, u, w, host_coefficients.columns(layouts.KOALA_M, numbers, indices))
        p_w, u_w = widen(p), widen(u)  # E31 from theta and u as stored (rounded where 16-bit, as on every path)
        torch._foreach_add_(p_w, u_w)
        torch._foreach_mul_(u_w, a)
        write_back(p, p_w)
        write_back(u, u_w)


def _multi_tensor_layers(p, h, u, w, c: dict[str, list]) -> None:
    """E33 and E34 on one bucket's lists, ``c`` the columns of coefficients as tensors or numbers
    (:func:`~koala_hf.optim.layers.add_scaled_`)."""
    p_w, h_w, u_w, w_w = (widen(t) for t in (p, h, u, w))
    add_scaled_(p_w, h_w, c["step_theta"])
    add_scaled_(u_w, h_w, c["step_u"])
    torch._foreach_mul_(w_w, c["keep_avg"])
    add_scaled_(w_w, p_w, c["take_theta"])
    for originals, copies in ((p, p_w), (u, u_w), (w, w_w)):
        write_back(originals, copies)


def _triton_update(optimizer, group_steps: list[GroupStep], coefficients, ok, batch, a: float, dtype) -> None:
    """E33, E34 and E31's predict: one launch per dtype for the layers of every group, masked by ``ok``."""
    batch.update("koala_m_update", coefficients, ok, a)


# The passes of each backend (koala_hf.optim.dispatch chooses the backend).
REDUCTIONS = {Backend.PER_TENSOR: eager_reduction(_eager_sums(_per_tensor_distances), foreach=False),
              Backend.FOREACH: eager_reduction(_eager_sums(_foreach_distances), foreach=True),
              Backend.FUSED_CPU: _cpu_sums, Backend.TRITON: _triton_sums}
UPDATES = {Backend.PER_TENSOR: _eager_update(_per_tensor_layers, _per_tensor_predict),
           Backend.FOREACH: foreach_update(_eager_update(_foreach_layers, _foreach_predict), _scalar_list_update),
           Backend.FUSED_CPU: _cpu_update, Backend.TRITON: _triton_update}
