"""A step's layers as the Triton kernels read them (koala_hf.optim.triton_kernels), and the passes over them.

The layers of a step are bucketed by dtype, across parameter groups (:class:`StepBatch`). A bucket reads its
layers' tensors through a table of addresses (``data_ptr``) uploaded once per step (:class:`Bucket`); its chunk
plan depends only on the layers' sizes and is built once and kept (:class:`ChunkPlan`). A layer whose tensors
do not share one dense memory layout (``channels_last`` and other permutations do) runs on contiguous copies
that the update writes back. :func:`layer_sums` launches a reduction and a combination per bucket,
:func:`update` one update per bucket; every launch goes through ``triton_runtime.launch``, where
koala_hf.optim.profiling counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from koala_hf.optim import triton_runtime
from koala_hf.optim.layouts import PassLayout
from koala_hf.optim.triton_runtime import BLOCK, CHUNK, triton_dtype


@dataclass
class ChunkPlan:
    """What depends only on a bucket's layers' sizes, rows and weight decays: built once, kept on the device."""

    chunks: torch.Tensor  # int64 [n_chunks, 2]
    spans: torch.Tensor  # int64 [n_layers, 2]: a layer's first chunk and number of chunks
    rows: torch.Tensor  # int64 [n_layers]
    decays: torch.Tensor  # float64 [n_layers], as given (converted to the arithmetic dtype in the kernels)

    @classmethod
    def build(cls, numels: list[int], rows: list[int], decays: list[float], device) -> "ChunkPlan":
        chunks, spans = [], []
        for layer, numel in enumerate(numels):
            starts = range(0, numel, CHUNK)
            spans.append((len(chunks), len(starts)))
            chunks.extend((layer, start) for start in starts)
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype).reshape(len(values), -1).to(device)  # noqa: E731
        return cls(as_tensor(chunks or [(0, 0)], torch.int64)[: len(chunks)], as_tensor(spans, torch.int64),
                   torch.tensor(rows, dtype=torch.int64, device=device), torch.tensor(decays, dtype=torch.float64, device=device))


class Bucket:
    """One dtype's layers of a step, as the kernels read them: addresses uploaded once, non-dense layers copied."""

    def __init__(self, layers: list[list[torch.Tensor]], rows: list[int], decays: list[float], chunk_plans: dict):
        first = layers[0][0]
        self.device, self.dtype = first.device, first.dtype
        for tensors in layers:
            if any(t.dtype != self.dtype or t.device != self.device for t in tensors):
                raise ValueError(f"fused Triton step: a layer mixes dtypes or devices ({[(t.dtype, str(t.device)) for t in tensors]}); "
                                 "keep each parameter's gradient and state in its own dtype, or use foreach=True")
        self.originals = layers
        self.tensors = [tensors if _one_dense_layout(tensors) else [t.detach().contiguous() for t in tensors] for tensors in layers]
        numels = [tensors[0].numel() for tensors in self.tensors]
        key = (self.device, self.dtype, tuple(numels), tuple(rows), tuple(decays))
        if key not in chunk_plans:
            chunk_plans[key] = ChunkPlan.build(numels, rows, decays, self.device)
        self.chunks = chunk_plans[key]
        self.table = upload([[t.data_ptr() for t in tensors] + [tensors[0].numel()] for tensors in self.tensors], self.device)

    @property
    def constants(self) -> dict:
        acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        return {"DTYPE": triton_dtype(self.dtype), "ACC": triton_dtype(acc), "CHUNK": CHUNK, "BLOCK": BLOCK}

    @property
    def n_chunks(self) -> int:
        return len(self.chunks.chunks)

    def write_back(self, written: tuple[int, ...]) -> None:
        """Store the results of the lists at positions ``written`` into the originals of layers that ran on copies."""
        for originals, tensors in zip(self.originals, self.tensors):
            if tensors is not originals:
                for k in written:
                    originals[k].detach().copy_(tensors[k])


def upload(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """An int64 table on ``device`` without a synchronisation: from pinned memory, asynchronously, on CUDA."""
    pinned = device.type == "cuda" and torch.cuda.is_available()
    return torch.tensor(rows, dtype=torch.int64, pin_memory=pinned).to(device, non_blocking=True)


def _one_dense_layout(tensors: list[torch.Tensor]) -> bool:
    """The tensors share one dense memory layout (contiguous, channels_last, any permutation): element ``i`` of
    each is then at the same offset, and the kernels can treat them as flat vectors."""
    first = tensors[0]
    if any(t.shape != first.shape or t.stride() != first.stride() for t in tensors):
        return False
    order = sorted(range(first.dim()), key=lambda d: -first.stride()[d])
    return first.detach().permute(order).is_contiguous()


def buckets(layer_lists: list[list[list[torch.Tensor]]], decays: list[float], chunk_plans: dict) -> list[Bucket]:
    """The step's layers by dtype. ``layer_lists[i]`` is layer ``i``'s tensors; its row in the step's sums and
    coefficients is ``i``."""
    by_dtype: dict = {}
    for row, tensors in enumerate(layer_lists):
        by_dtype.setdefault((tensors[0].device, tensors[0].dtype), []).append(row)
    return [Bucket([layer_lists[r] for r in rows], rows, [decays[r] for r in rows], chunk_plans) for rows in by_dtype.values()]


def layer_sums(buckets_: list[Bucket], n_layers: int, layout: PassLayout, kernel: str, device, dtype) -> torch.Tensor:
    """``[n_layers, len(layout.sums)]`` sums of every layer of the step: a reduction and a combination launch per
    bucket, in the layout's columns."""
    found = triton_runtime.kernels().LAUNCHED
    width = len(layout.sums)
    sums = torch.empty(n_layers, width, dtype=dtype, device=device)
    for bucket in buckets_:
        partials = torch.empty(bucket.n_chunks, width, dtype=torch.float64 if bucket.dtype == torch.float64 else torch.float32,
                               device=bucket.device)
        if bucket.n_chunks:
            triton_runtime.launch(found[kernel], (bucket.n_chunks,), bucket.table, bucket.chunks.chunks, bucket.chunks.decays,
                                  partials, **bucket.constants, **layout.triton_constants("lists", "sums"))
        triton_runtime.launch(found["combine"], (len(bucket.chunks.rows),), partials, bucket.chunks.spans, bucket.chunks.rows,
                              sums, K=width, KP=triton_power_of_two(width))
    return sums


def update(buckets_: list[Bucket], layout: PassLayout, kernel: str, coefficients: torch.Tensor, ok: torch.Tensor,
           *scalars) -> None:
    """The elementwise update of every layer of the step: one launch per bucket, masked by ``ok`` on the device;
    the lists the layout says the update writes are written back where a layer ran on copies."""
    found = triton_runtime.kernels().LAUNCHED
    for bucket in buckets_:
        if bucket.n_chunks:
            triton_runtime.launch(found[kernel], (bucket.n_chunks,), bucket.table, bucket.chunks.chunks, bucket.chunks.rows,
                                  bucket.chunks.decays, coefficients, ok, *scalars, **bucket.constants,
                                  **layout.triton_constants("lists", "coefficients"))
        bucket.write_back(layout.written_positions)


def triton_power_of_two(n: int) -> int:
    """The smallest power of two at least ``n`` (a Triton block's size)."""
    return 1 << max(n - 1, 0).bit_length()


class StepBatch:
    """Every group of a step that runs on the Triton kernels, batched, its tensor lists in ``layout``'s order:
    ``layers[g][i]`` is group ``g``'s layer ``i`` (its tensors), ``decays[g]`` the group's weight decay. Built in
    the reduction pass and kept for the update, so that both read the same addresses (and the same copies)."""

    def __init__(self, layout: PassLayout, layers: list[list[list[torch.Tensor]]], decays: list[float], chunk_plans: dict):
        self.layout = layout
        self.sizes = [len(group) for group in layers]
        flat = [tensors for group in layers for tensors in group]
        flat_decays = [decay for group, decay in zip(layers, decays) for _ in group]
        self.buckets = buckets(flat, flat_decays, chunk_plans)
        self.n_layers = len(flat)

    def sums(self, kernel: str, device, dtype) -> list[torch.Tensor]:
        """Each group's ``[n_layers, len(layout.sums)]`` sums (views of one table for the whole step)."""
        return list(layer_sums(self.buckets, self.n_layers, self.layout, kernel, device, dtype).split(self.sizes))

    def update(self, kernel: str, coefficients: list[torch.Tensor], ok: torch.Tensor, *scalars) -> None:
        table = coefficients[0] if len(coefficients) == 1 else torch.cat(coefficients)
        update(self.buckets, self.layout, kernel, table, ok, *scalars)
