"""The foreach update's per-layer coefficients as numbers on the host, off the CPU.

Every layer has its own coefficients (E14-E17, E21, E33-E34). As a list of 0-d tensors on the device, they
send torch's multi-tensor ops down its slow route on CUDA: one kernel per layer and op, because the
coefficient list's shapes differ from the tensors' (koala_hf.optim.profiling.multi_tensor_launches). As
numbers on the host (a scalar list), every op takes the fast route: a few launches for all layers.

So off the CPU the foreach update copies every group's coefficients and the step's ``ok`` to the host in
**one** copy, one synchronisation per step, and applies them as scalar lists. A step that is not ``ok`` is
then skipped without masking. The price is that synchronisation, and a temporary for each scaled term:
torch has no multi-tensor ``x += c_i * y`` with a scalar list, so such a term is ``y * c_i`` into a new list,
then added; a term with one number for every layer is one add, and KOALA++'s ``H_prev <- H`` a copy
(koala_hf.optim.layers.add_scaled_, blend_). On the CPU (:data:`DEVICE_COEFFICIENTS`) the coefficients
stay tensors: torch's CPU multi-tensor ops loop over the tensors whatever their arguments, a value is read
for free there, and the fewer passes are faster. The Triton step (the default on CUDA) reads nothing back;
this is the foreach path, the fallback where Triton cannot run and the path of other devices.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from koala_hf.optim.layouts import PassLayout

# Devices whose foreach update keeps the coefficients as tensors. Tests empty it to run the host path on the CPU.
DEVICE_COEFFICIENTS = ("cpu",)


def wanted(tensors: list[torch.Tensor]) -> bool:
    """Whether the foreach update of layers like ``tensors[0]`` reads its coefficients to the host."""
    return bool(tensors) and tensors[0].device.type not in DEVICE_COEFFICIENTS


class HostCoefficients(NamedTuple):
    """A step's coefficients as Python floats: per group, its ``[n_layers, k]`` table row by row; and ``ok``."""

    groups: list[list[float]]
    ok: bool


def read(coefficients: list[torch.Tensor], ok: torch.Tensor) -> HostCoefficients:
    """Every group's ``[n_layers, k]`` coefficients and ``ok``, in one copy to the host.

    Read in float64, which holds a float32 coefficient exactly: each op then multiplies by the value the
    per-tensor path multiplies by.
    """
    flat = torch.cat([c.reshape(-1).to(ok.device, torch.float64) for c in coefficients]
                     + [ok.reshape(1).to(torch.float64)]).cpu()
    values = flat.tolist()
    groups, start = [], 0
    for c in coefficients:
        groups.append(values[start:start + c.numel()])
        start += c.numel()
    return HostCoefficients(groups, values[-1] != 0)


def columns(layout: PassLayout, numbers: list[float], indices: list[int]) -> dict[str, list[float]]:
    """A group's numbers (one of :attr:`HostCoefficients.groups`) by the layout's columns of coefficients, for
    the layers ``indices`` (one (device, dtype) bucket; all of them, the usual case, without a copy)."""
    width = len(layout.coefficients)
    by_name = {name: numbers[k::width] for k, name in enumerate(layout.coefficients)}
    if len(indices) == len(numbers) // width:
        return by_name
    return {name: [values[i] for i in indices] for name, values in by_name.items()}
