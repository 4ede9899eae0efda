"""The reduction pass of KOALA-V and KOALA-M: per layer ``||H||^2`` and ``||theta||^2`` (E21, E33; ``theta.theta``
for E3's layer loss, 0 without weight decay), and KOALA-M's own sums, accumulated in the optimizer's scalar dtype,
in the columns of the variant's layout (koala_hf.optim.layouts)."""

from __future__ import annotations

import torch

from koala_hf.optim.cpu_kernels import cpu_kernels
from koala_hf.optim.group_step import GroupStep, Prepared
from koala_hf.optim.layers import bucketed_rows, dots
from koala_hf.optim.layouts import PassLayout


def eager_norms(step: GroupStep, jacobians: list[torch.Tensor], device, dtype, foreach: bool) -> dict[str, torch.Tensor]:
    """The ``hh`` and ``theta_theta`` columns, ``[n_layers]`` each, from the formed ``H``: a ``dot`` per layer, or
    multi-tensor sums on the foreach path (:func:`~koala_hf.optim.layers.dots`)."""
    theta_sq = dots(step.shards, None, dtype, foreach, device) if step.weight_decay else \
        torch.zeros(len(jacobians), dtype=dtype, device=device)
    return {"hh": dots(jacobians, None, dtype, foreach, device), "theta_theta": theta_sq}


def cpu_norms(step: GroupStep, layout: PassLayout, kernel: str, device, dtype) -> torch.Tensor:
    """The multi-tensor C++ kernel ``kernel``, one call per dtype, ``H`` formed inside: ``[n_layers, len(layout.sums)]``."""
    op, wd = getattr(cpu_kernels(), kernel), step.weight_decay
    norms = bucketed_rows(step.lists(layout), lambda *lists: op(*lists, wd)).to(device, dtype)
    if not wd:
        norms[:, layout.position("sums", "theta_theta")] = 0.0  # only enters through wd (E3), as in the other paths
    return norms


def triton_norms(optimizer, group_steps: list[GroupStep], layout: PassLayout, kernel: str, device, dtype) -> Prepared:
    """The Triton kernels for every group at once (a reduction and a combination launch per dtype); the batch is
    the plan the update uses."""
    batch = optimizer._triton_batches.get(layout, group_steps, optimizer._triton_chunk_plans)
    return Prepared(batch.sums(kernel, device, dtype), batch)
