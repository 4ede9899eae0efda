"""Per-layer building blocks shared by the KOALA optimizers.

Every KOALA update is computed per parameter tensor ("layer") on the tensor
flattened to a vector (spec, common ground). These helpers form the layer's
measurement Jacobian ``H = g + wd * theta`` (E3), its dot products in float32 or
wider, and the masking that lets a skipped step leave everything untouched
without reading a value back to the host.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

LOW_PRECISION = (torch.float16, torch.bfloat16)
# A layer whose measurement Jacobian has a norm below this is not updated (official code).
MIN_JACOBIAN_NORM = 1e-9


@functools.cache  # torch.promote_types dispatches an op: once per dtype, not once per layer and step
def reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer's reductions and update arithmetic run in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def measurement_jacobians(
    params: list[torch.Tensor], grads: list[torch.Tensor], weight_decay: float, foreach: bool,
    out: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``H = g + wd * theta`` per layer (E3). With ``wd == 0`` the gradients themselves (not copies).

    ``out``: tensors to write ``H`` into (the foreach path's reused workspace) instead of new ones.
    """
    if weight_decay == 0:
        return list(grads)
    if not foreach:
        return [g.add(p, alpha=weight_decay) for p, g in zip(params, grads)]
    if out is None:
        return list(torch._foreach_add(grads, params, alpha=weight_decay))
    torch._foreach_copy_(out, grads)
    torch._foreach_add_(out, params, alpha=weight_decay)
    return out


class StepWorkspace:
    """Reused per-parameter temporaries of the foreach paths on the CPU (``H``, KOALA-M's ``d``), never saved.

    A new parameter-sized tensor every step costs page faults on the CPU (the C
    allocator hands large blocks back to the system); CUDA's caching allocator
    reuses its blocks, so there the paths allocate per step as before.
    """

    def __init__(self) -> None:
        self._buffers = WeakIdKeyDictionary()  # keyed by the parameter object, dropped with it

    def get(self, params: list[torch.Tensor], local_params: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Buffers shaped like ``local_params`` (this process's shards), or ``None`` off the CPU."""
        if any(t.device.type != "cpu" for t in local_params):
            return None
        buffers = []
        for p, t in zip(params, local_params):
            buffer = self._buffers.get(p)
            if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype or buffer.stride() != t.stride():
                buffer = self._buffers[p] = torch.empty_like(t, memory_format=torch.preserve_format)
            buffers.append(buffer)
        return buffers


def dot(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x . y`` over the flattened tensors, accumulated in ``dtype``."""
    return torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype))


# Devices where the foreach paths take each layer's sums with one ``dot`` per layer: on the CPU a per-layer op
# costs no launch, and a dot reads its two tensors once. Elsewhere they use multi-tensor sums (``dots``), a
# constant number of launches for any number of layers. Tests empty it to check those sums on the CPU.
PER_LAYER_SUMS = ("cpu",)


def dots(xs: list[torch.Tensor], ys: list[torch.Tensor] | None, dtype: torch.dtype | None, foreach: bool,
         device: torch.device) -> torch.Tensor:
    """``[n]``: ``x_i . y_i`` (``ys=None``: ``x_i . x_i``) accumulated in ``dtype`` (``None``: in each layer's
    :func:`reduction_dtype`), on ``device``.

    ``foreach``: layers already in their accumulation dtype (float32, float64) and off :data:`PER_LAYER_SUMS`
    are summed with multi-tensor ops, a fixed number per (device, dtype): ``||x||^2`` as a squared
    ``_foreach_norm``, and ``x . y`` as ``2 sum(max(p, 0)) - sum(|p|)`` over the products ``p = x * y`` (two
    1-norms; their rounding is that of a plain sum of the products). The others (16-bit layers, which must
    widen first) take a ``dot`` each, as the per-tensor path does.
    """
    ys_ = xs if ys is None else ys
    accumulate = [dtype or reduction_dtype(x.dtype) for x in xs]
    multi = [i for i, (x, y) in enumerate(zip(xs, ys_)) if foreach and x.dtype == y.dtype == accumulate[i]
             and x.device.type not in PER_LAYER_SUMS]
    single = sorted(set(range(len(xs))) - set(multi))
    per_layer = [dot(xs[i], ys_[i], accumulate[i]).to(device) for i in single]
    if not multi:
        return torch.stack(per_layer) if xs else torch.zeros(0, dtype=dtype or torch.float32, device=device)
    columns = []  # (layer indices, their sums)
    for (x, y), indices in group_by_device_and_dtype([[xs[i] for i in multi], [ys_[i] for i in multi]]).values():
        if ys is None:
            sums = torch.stack(torch._foreach_norm(x, 2)).square()
        else:
            products = torch._foreach_mul(x, y)
            magnitudes = torch.stack(torch._foreach_norm(products, 1))
            torch._foreach_clamp_min_(products, 0.0)
            sums = 2 * torch.stack(torch._foreach_norm(products, 1)) - magnitudes
        columns.append(([multi[j] for j in indices], sums.to(device)))
    if not single and len(columns) == 1:
        return columns[0][1]
    if single:
        columns.append((single, torch.stack(per_layer)))
    out_dtype = functools.reduce(torch.promote_types, accumulate)
    out = torch.empty(len(xs), dtype=out_dtype, device=device)
    for indices, sums in columns:
        out[indices] = sums.to(out_dtype)
    return out


# Devices whose values a step reads back for free (no device synchronisation): there a skipped step is
# skipped instead of masked. Tests empty it to run the masked, synchronisation-free path of other devices.
HOST_READABLE = ("cpu",)


def skipped_on_host(ok: torch.Tensor) -> bool:
    """``True`` when ``ok`` is false and can be read without a synchronisation (the update can be skipped);
    ``False`` when the step is taken or ``ok`` lives on a device (the update then masks with :func:`finite_mask`)."""
    return ok.device.type in HOST_READABLE and not bool(ok)


def finite_mask(
    jacobians: list[torch.Tensor], ok: torch.Tensor, owned: bool
) -> list[torch.Tensor]:
    """The Jacobians with every element zeroed when ``ok`` is false.

    Multiplying a non-finite gradient by a zero coefficient still gives NaN, so a
    step skipped for a non-finite gradient must not see it at all. ``owned``
    says the tensors are temporaries this step made (masked in place); the
    user's gradients are never written to. Where ``ok`` reads back for free
    (:data:`HOST_READABLE`) and is true, there is nothing to mask.
    """
    if ok.device.type in HOST_READABLE and bool(ok):
        return jacobians
    if owned:
        skipped = {}  # ``~ok`` once per device, not once per layer
        for h in jacobians:
            if h.device not in skipped:
                skipped[h.device] = ~ok.to(h.device)
            h.masked_fill_(skipped[h.device], 0)
        return jacobians
    zero = torch.zeros((), device=ok.device)  # one 0-d zero for every layer (its dtype defers to each layer's)
    return [torch.where(ok, h, zero) for h in jacobians] if all(h.device == ok.device for h in jacobians) else \
        [torch.where(ok.to(h.device), h, zero.to(h.device)) for h in jacobians]


def add_scaled_(xs: list[torch.Tensor], ys: list[torch.Tensor], scales: list) -> None:
    """``x_i += scales_i * y_i`` over lists, the foreach updates' one kind of term. ``scales``: per-layer 0-d
    tensors (one ``addcmul``; on CUDA torch's slow route, a kernel per layer), or numbers read to the host
    (koala_hf.optim.host_coefficients: torch has no multi-tensor ``x += c_i y`` with numbers, so a product into
    a temporary, then an add, both on torch's fast route; one number for all layers is one add, without it)."""
    if isinstance(scales[0], torch.Tensor):
        torch._foreach_addcmul_(xs, ys, scales)
    elif scales.count(scales[0]) == len(scales):  # one number for every layer (KOALA++'s c_h = q): no temporary
        torch._foreach_add_(xs, ys, alpha=scales[0])
    else:
        torch._foreach_add_(xs, torch._foreach_mul(ys, scales))


def blend_(xs: list[torch.Tensor], ys: list[torch.Tensor], keep: list, take: list) -> None:
    """``x_i <- keep_i x_i + take_i y_i``; as numbers, keep 0 and take 1 for every layer (a step that updates
    every layer: KOALA++'s ``H_prev <- H``, E17) is a copy of ``ys``."""
    if not isinstance(keep[0], torch.Tensor) and keep.count(0) == len(keep) and take.count(1) == len(take):
        torch._foreach_copy_(xs, ys)
        return
    torch._foreach_mul_(xs, keep)
    add_scaled_(xs, ys, take)


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
    keys = {(t.device, t.dtype) for t in tensor_lists[0]}
    if len(keys) == 1:  # the usual case, one bucket: the lists as they are (a step calls this for every pass)
        return {keys.pop(): ([list(tensors) for tensors in tensor_lists], list(range(len(tensor_lists[0]))))}
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


def bucketed_rows(tensor_lists: list[list[torch.Tensor]], call) -> torch.Tensor:
    """Per-layer rows computed one (device, dtype) bucket at a time, ``call(*bucket_lists) -> [n_bucket, k]``,
    returned in layer order (float64 when buckets differ in dtype)."""
    buckets = group_by_device_and_dtype(tensor_lists)
    if len(buckets) == 1:
        (lists, _), = buckets.values()
        return call(*lists)
    parts = [(indices, call(*lists)) for lists, indices in buckets.values()]
    dtypes = {rows.dtype for _, rows in parts}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
    out = torch.empty(len(tensor_lists[0]), parts[0][1].shape[1], dtype=dtype, device=parts[0][1].device)
    for indices, rows in parts:
        out[indices] = rows.to(out.device, dtype)
    return out
