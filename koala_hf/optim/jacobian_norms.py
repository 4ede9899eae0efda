"""The reduction pass of KOALA-V and KOALA-M: per layer ``[||H||^2, ||theta||^2]`` (E21, E33; ``theta.theta`` for
E3's layer loss, 0 without weight decay), accumulated in the optimizer's scalar dtype."""

from __future__ import annotations

import torch

from koala_hf.optim import triton_step
from koala_hf.optim.cpu_kernels import cpu_kernels
from koala_hf.optim.group_step import GroupStep, Prepared
from koala_hf.optim.layers import bucketed_rows, dot


def eager_norms(step: GroupStep, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[n_layers, 2]`` from the formed ``H`` (per-tensor and foreach paths)."""
    zero = torch.zeros((), dtype=dtype, device=device)
    wd = step.weight_decay
    return torch.stack([torch.stack([dot(h, h, dtype).to(device), dot(p, p, dtype).to(device) if wd else zero])
                        for p, h in zip(step.shards, step.jacobians)])


def cpu_norms(step: GroupStep, device: torch.device, dtype: torch.dtype, averages: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The multi-tensor C++ kernel, one call per dtype; ``H`` formed inside. With the layers' ``averages``
    (KOALA-M's ``w_avg``) it also gives ``[d.d, d.H]`` for ``d = w_avg - theta`` (columns 2 and 3)."""
    kernels, wd = cpu_kernels(), step.weight_decay
    lists = [step.shards, step.grads] + ([averages] if averages is not None else [])
    norms = bucketed_rows(lists, lambda p, g, *w: kernels.koala_jacobian_sums(p, g, w[0] if w else [], wd))
    norms = norms.to(device, dtype)
    if not wd:
        norms[:, 1] = 0.0  # ||theta||^2 only enters through wd (E3), as in the other paths
    return norms


def triton_norms(optimizer, group_steps: list[GroupStep], device, dtype, averages: bool = False) -> Prepared:
    """The Triton kernels for every group at once (a reduction and a combination launch per dtype); with
    ``averages``, KOALA-M's ``[d.d, d.H]`` too. The tables' lists: theta, g, w_avg, u (KOALA-M) or theta, g."""
    layers = [list(zip(s.shards, s.grads, s.state_shards("w_avg"), s.state_shards("u"))) if averages
              else list(zip(s.shards, s.grads)) for s in group_steps]
    batch = triton_step.StepBatch(layers, [s.weight_decay for s in group_steps], optimizer._triton_layouts)
    return Prepared(batch.sums(4 if averages else 2, "jacobian_partials", device, dtype, K=4 if averages else 2), batch)
