"""Which implementation runs a parameter group's step: the one place it is decided.

A KOALA step has the same two passes on every path, a reduction (each layer's sums) and an elementwise update;
only how they run differs:

* ``PER_TENSOR``: one layer at a time (plain torch ops).
* ``FOREACH``: torch's multi-tensor ops, a few calls per (device, dtype) bucket.
* ``FUSED_CPU``: one call of a multi-tensor C++ kernel per pass for all layers of a dtype, without the temporary
  ``H`` (koala_hf.optim.cpu_kernels, built on first use).
* ``COMPILED``: KOALA++'s per-layer ``torch.compile`` kernels, its fused step off the CPU.

The group's ``foreach`` and ``fused`` options choose, as in torch's optimizers: ``fused=True`` asks for the
device's fused backend; otherwise ``foreach`` (``None``: torch's default, multi-tensor on CUDA), else per
tensor. ``fused`` and ``foreach`` are alternatives, so both set is refused.

The one fallback rule: a fused backend that cannot be built here (the C++ kernels without a compiler or
ninja) warns once, saying why, and the step runs the ``FOREACH`` path instead: the same results, more calls.
"""

from __future__ import annotations

import enum

import torch
from torch.optim.optimizer import _default_to_fused_or_foreach

from koala_hf.optim import cpu_kernels


class Backend(enum.Enum):
    PER_TENSOR = "per-tensor"
    FOREACH = "foreach"
    FUSED_CPU = "fused-cpu"
    COMPILED = "compiled"

    @property
    def fused(self) -> bool:
        """The passes run in fused kernels, which form ``H = g + wd theta`` themselves (it is never stored)."""
        return self in (Backend.FUSED_CPU, Backend.COMPILED)


def check_options(group: dict, optimizer: str) -> None:
    """Refuse ``foreach`` / ``fused`` values that name no backend (at construction and for added groups)."""
    fused, foreach = group["fused"], group["foreach"]
    if not isinstance(fused, bool):
        raise ValueError(f"{optimizer}: fused must be True or False, got {fused!r}")
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(f"{optimizer}: foreach must be None, True or False, got {foreach!r}")
    if fused and foreach:
        raise ValueError(f"{optimizer}: fused=True and foreach=True are alternatives; set one of them")


def choose_backend(group: dict, tensors: list[torch.Tensor], optimizer: str, *, off_cpu: Backend | None) -> Backend:
    """The backend for one group's step over ``tensors`` (this process's shards of the parameters stepped).

    ``off_cpu``: the variant's fused backend for devices other than the CPU, or ``None`` when it has none (then
    ``fused=True`` off the CPU is refused, naming ``foreach``).
    """
    if not group["fused"]:
        if group["foreach"] is not None:
            return Backend.FOREACH if group["foreach"] else Backend.PER_TENSOR
        default = _default_to_fused_or_foreach(tensors, differentiable=False, use_fused=False)[1]
        return Backend.FOREACH if default else Backend.PER_TENSOR
    devices = {t.device.type for t in tensors}
    if devices == {"cpu"}:
        return Backend.FUSED_CPU if cpu_kernels.cpu_kernels() is not None else Backend.FOREACH  # the fallback rule
    refuse_fused_off_cpu(devices, optimizer, off_cpu)
    return off_cpu


def refuse_fused_off_cpu(devices: set[str], optimizer: str, off_cpu: Backend | None) -> None:
    """Raise ``RuntimeError`` for ``fused=True`` on devices where the variant has no fused backend."""
    others = sorted(devices - {"cpu"})
    if others and off_cpu is None:
        raise RuntimeError(
            f"{optimizer}(fused=True) has CPU kernels only, and parameters are on {', '.join(others)}; "
            "use foreach=True there (the default on CUDA), or KOALAPlusPlus(fused=True)"
        )
    if others and "cpu" in devices:
        raise RuntimeError(f"{optimizer}(fused=True) needs every parameter of a group on one device type; "
                           f"this group mixes cpu and {', '.join(others)}: put them in separate groups")
