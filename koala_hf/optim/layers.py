"""Per-layer building blocks shared by the KOALA optimizers.

Every KOALA update is computed per parameter tensor ("layer") on the tensor
flattened to a vector (spec, common ground). These helpers form the layer's
measurement Jacobian ``H = g + wd * theta`` (E3), its dot products in float32 or
wider, and the masking that lets a skipped step leave everything untouched
without reading a value back to the host.
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer's reductions and update arithmetic run in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def measurement_jacobians(
    params: list[torch.Tensor], grads: list[torch.Tensor], weight_decay: float, foreach: bool
) -> list[torch.Tensor]:
    """``H = g + wd * theta`` per layer (E3). With ``wd == 0`` the gradients themselves (not copies)."""
    if weight_decay == 0:
        return list(grads)
    if foreach:
        return list(torch._foreach_add(grads, params, alpha=weight_decay))
    return [g.add(p, alpha=weight_decay) for p, g in zip(params, grads)]


def dot(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x . y`` over the flattened tensors, accumulated in ``dtype``."""
    return torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype))


def finite_mask(
    jacobians: list[torch.Tensor], ok: torch.Tensor, owned: bool
) -> list[torch.Tensor]:
    """The Jacobians with every element zeroed when ``ok`` is false.

    Multiplying a non-finite gradient by a zero coefficient still gives NaN, so a
    step skipped for a non-finite gradient must not see it at all. ``owned``
    says the tensors are temporaries this step made (masked in place); the
    user's gradients are never written to.
    """
    if owned:
        for h in jacobians:
            h.masked_fill_(~ok.to(h.device), 0)
        return jacobians
    return [torch.where(ok.to(h.device), h, 0) for h in jacobians]


def widen(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """float16/bfloat16 tensors as float32 copies, wider ones as they are.

    The update arithmetic runs on these so that no coefficient is rounded to
    8 bits; :func:`write_back` stores results into the low-precision originals.
    """
    return [t.float() if t.dtype in LOW_PRECISION else t for t in tensors]


def write_back(originals: list[torch.Tensor], copies: list[torch.Tensor]) -> None:
    """Copy results computed on :func:`widen` copies into their originals."""
    for original, copy in zip(originals, copies):
        if copy is not original:
            original.copy_(copy)


def group_by_device_and_dtype(tensor_lists: list[list[torch.Tensor]]):
    """Bucket parallel lists by (device, dtype) for the foreach paths, keeping each bucket's indices."""
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[list[torch.Tensor]], list[int]]] = {}
    for index, first in enumerate(tensor_lists[0]):
        key = (first.device, first.dtype)
        if key not in buckets:
            buckets[key] = ([[] for _ in tensor_lists], [])
        lists, indices = buckets[key]
        for bucket_list, tensors in zip(lists, tensor_lists):
            bucket_list.append(tensors[index])
        indices.append(index)
    return buckets
