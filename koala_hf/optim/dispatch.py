"""Which implementation runs a parameter group's step: the one place it is decided.

A KOALA step has the same two passes on every path, a reduction (each layer's sums) and an elementwise update;
only how they run differs:

* ``PER_TENSOR``: one layer at a time (plain torch ops).
* ``FOREACH``: torch's multi-tensor ops, a few calls per (device, dtype) bucket.
* ``FUSED_CPU``: one call of a multi-tensor C++ kernel per pass for all layers of a dtype, without the temporary
  ``H`` (koala_hf.optim.cpu_kernels, built on first use).
* ``TRITON``: three Triton launches per dtype for all layers of every such group, without ``H``
  (koala_hf.optim.triton_kernels); on CUDA, or on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

The group's ``foreach`` and ``fused`` options choose, as in torch's optimizers: ``fused=True`` asks for the
device's fused backend (C++ on the CPU, Triton on CUDA), ``fused="triton"`` for the Triton kernels, ``fused=False``
for none; ``fused=None`` (the default) is the Triton kernels on CUDA and no fused backend elsewhere. Without a
fused backend, ``foreach`` chooses (``None``: torch's default, multi-tensor on CUDA), else per tensor. ``fused``
and ``foreach=True`` are alternatives, so both set is refused, and so is a ``fused`` that names no backend.

The one fallback rule: a fused backend that cannot run here (the C++ kernels without a compiler or ninja;
Triton not installed), asked for with ``fused=True`` or by default on CUDA, is said once with the reason, and
the step runs the ``FOREACH`` path instead: the same results, more calls. ``fused="triton"`` asks for one
backend and is refused where it cannot run.
"""

from __future__ import annotations

import enum
import warnings

import torch
from torch.optim.optimizer import _default_to_fused_or_foreach

from koala_hf.optim import cpu_kernels

FUSED_CHOICES = (None, False, True, "triton")


class Backend(enum.Enum):
    PER_TENSOR = "per-tensor"
    FOREACH = "foreach"
    FUSED_CPU = "fused-cpu"
    TRITON = "triton"

    @property
    def fused(self) -> bool:
        """The passes run in fused kernels, which form ``H = g + wd theta`` themselves (it is never stored)."""
        return self in (Backend.FUSED_CPU, Backend.TRITON)


def check_options(group: dict, optimizer: str) -> None:
    """Refuse ``foreach`` / ``fused`` values that name no backend (at construction and for added groups)."""
    fused, foreach = group["fused"], group["foreach"]
    if not any(fused is choice or (isinstance(fused, str) and fused == choice) for choice in FUSED_CHOICES):
        raise ValueError(f"{optimizer}: fused must be None, True, False or 'triton', got {fused!r}")
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(f"{optimizer}: foreach must be None, True or False, got {foreach!r}")
    if fused and foreach:
        raise ValueError(f"{optimizer}: fused={fused!r} and foreach=True are alternatives; set one of them")


def choose_backend(group: dict, tensors: list[torch.Tensor], optimizer: str) -> Backend:
    """The backend for one group's step over ``tensors`` (this process's shards of the parameters stepped)."""
    fused = group["fused"]
    if fused is None:  # the default: the Triton kernels on CUDA (unless foreach was asked for), else no fused backend
        devices = {t.device.type for t in tensors}
        if devices == {"cuda"} and group["foreach"] is None:
            return Backend.TRITON if _triton_runs(devices, optimizer, asked="by default on CUDA") else Backend.FOREACH
        fused = False
    if not fused:
        if group["foreach"] is not None:
            return Backend.FOREACH if group["foreach"] else Backend.PER_TENSOR
        default = _default_to_fused_or_foreach(tensors, differentiable=False, use_fused=False)[1]
        return Backend.FOREACH if default else Backend.PER_TENSOR
    devices = {t.device.type for t in tensors}
    check_fused_devices(fused, devices, optimizer)
    if fused == "triton":
        return Backend.TRITON
    if devices == {"cpu"}:
        return Backend.FUSED_CPU if cpu_kernels.cpu_kernels() is not None else Backend.FOREACH  # the fallback rule
    return Backend.TRITON if _triton_runs(devices, optimizer, asked="(fused=True)") else Backend.FOREACH  # the fallback rule


def check_fused_devices(fused, devices: set[str], optimizer: str) -> None:
    """Raise ``RuntimeError`` for a fused request on devices it has no backend for (at construction and at steps)."""
    if len(devices) > 1:
        raise RuntimeError(f"{optimizer}(fused={fused!r}) needs every parameter of a group on one device type; "
                           f"this group mixes {', '.join(sorted(devices))}: put them in separate groups")
    if fused == "triton":
        from koala_hf.optim import triton_runtime

        reason = triton_runtime.unavailable(devices)
        if reason is not None:
            raise RuntimeError(f"{optimizer}(fused='triton') cannot run here: {reason}. Use fused=True (C++ on the "
                               "CPU, Triton on CUDA) or foreach=True")
    elif devices - {"cpu", "cuda"}:
        raise RuntimeError(f"{optimizer}(fused=True) runs C++ kernels on the CPU and Triton kernels on CUDA, and "
                           f"parameters are on {', '.join(sorted(devices))}; use foreach=True there")


_WARNED_TRITON = False


def _triton_runs(devices: set[str], optimizer: str, asked: str) -> bool:
    """Whether the Triton kernels can run on ``devices``; if not, say so once (the fallback rule)."""
    global _WARNED_TRITON
    from koala_hf.optim import triton_runtime

    reason = triton_runtime.unavailable(devices)
    if reason is not None and not _WARNED_TRITON:
        _WARNED_TRITON = True
        warnings.warn(f"{optimizer} runs its Triton kernels {asked}, and they cannot run here ({reason}); it runs "
                      "the foreach path instead (same results, more launches and one synchronisation per step).",
                      RuntimeWarning, stacklevel=4)
    return reason is None
