"""A step's layers as the Triton kernels read them (koala_hf.optim.triton_kernels), and the passes over them.

The layers of a step are bucketed by dtype, across parameter groups (:class:`StepBatch`). A bucket reads its
layers' tensors through a table of addresses (``data_ptr``) (:class:`Bucket`); its chunk plan depends only on
the layers' sizes and is built once and kept (:class:`ChunkPlan`). A layer whose tensors do not share one
dense memory layout (``channels_last`` and other permutations do) runs on contiguous copies that the update
writes back. A step's batch is kept (:class:`BatchCache`) and reused for as long as its parameters are
unchanged, its tables pointed at gradients that moved, so that a step builds nothing per layer.
:func:`layer_sums` launches a reduction and a combination per bucket, :func:`fused_scalar_step` the
variant's scalar step once (koala_hf.optim.triton_scalar_kernels), :func:`update` one update per bucket;
every launch goes through ``triton_runtime.launch``, where koala_hf.optim.profiling counts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import Callable

import torch

from koala_hf.measurement import stat_constants
from koala_hf.optim import triton_runtime
from koala_hf.optim.dispatch import Backend
from koala_hf.optim.layers import MIN_JACOBIAN_NORM
from koala_hf.optim.layouts import PassLayout
from koala_hf.optim.triton_runtime import BLOCK, CHUNK, triton_dtype

SCALAR_BLOCK = 256  # layers per vector operation of the scalar step's one program


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
        tensors = [ts if _one_dense_layout(ts) else [t.detach().contiguous() for t in ts] for ts in layers]
        # Only the layers on copies are held (to write back): a kept batch holds no gradient alive.
        self.copies = [(originals, copied) for originals, copied in zip(layers, tensors) if copied is not originals]
        numels = [ts[0].numel() for ts in tensors]
        key = (self.device, self.dtype, tuple(numels), tuple(rows), tuple(decays))
        if key not in chunk_plans:
            chunk_plans[key] = ChunkPlan.build(numels, rows, decays, self.device)
        self.chunks = chunk_plans[key]
        self.rows = rows
        # The table on the host, kept so that gradients that moved can be rebound (:meth:`rebind`).
        self.addresses = torch.tensor([[t.data_ptr() for t in ts] + [ts[0].numel()] for ts in tensors],
                                      dtype=torch.int64)
        self.table = upload(self.addresses, self.device)
        self.partials: torch.Tensor | None = None  # the reduction's per-chunk sums, allocated at the first step

    @property
    def constants(self) -> dict:
        acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        return {"DTYPE": triton_dtype(self.dtype), "ACC": triton_dtype(acc), "CHUNK": CHUNK, "BLOCK": BLOCK}

    @property
    def n_chunks(self) -> int:
        return len(self.chunks.chunks)

    def rebind(self, column: int, tensors: list[torch.Tensor]) -> None:
        """Point list ``column`` of the table at ``tensors`` (one per layer, each laid out as the one it replaces)."""
        self.addresses[:, column] = torch.tensor(list(map(torch.Tensor.data_ptr, tensors)), dtype=torch.int64)
        self.table = upload(self.addresses, self.device)

    def write_back(self, written: tuple[int, ...]) -> None:
        """Store the results of the lists at positions ``written`` into the originals of layers that ran on copies."""
        for originals, copied in self.copies:
            for k in written:
                originals[k].detach().copy_(copied[k])


def upload(rows: list[list] | torch.Tensor, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A table (nested lists, or a CPU tensor, copied) on ``device`` without a synchronisation: from pinned
    memory, asynchronously, on CUDA."""
    pinned = device.type == "cuda" and torch.cuda.is_available()
    if isinstance(rows, torch.Tensor):
        host = rows.pin_memory() if pinned else rows.clone()
        return host.to(device, non_blocking=True)
    return torch.tensor(rows, dtype=dtype, pin_memory=pinned).to(device, non_blocking=True)


@dataclass
class ScalarTables:
    """What the fused scalar step (a variant's ``*_coefficients`` kernel) reads and writes besides the sums and the
    state, built once per batch: each layer's parameter group, and its two outputs."""

    groups: torch.Tensor  # int64 [n_layers]: the index of each layer's parameter group
    ok: torch.Tensor  # bool []: the step's flag, the sums' finiteness included
    coefficients: torch.Tensor  # [n_layers, N_COEF]


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


def layer_sums(buckets_: list[Bucket], sums: torch.Tensor, layout: PassLayout, kernel: str) -> torch.Tensor:
    """Into ``sums`` (``[n_layers, len(layout.sums)]``), the sums of every layer of the step: a reduction and a
    combination launch per bucket, in the layout's columns."""
    found = triton_runtime.kernels().LAUNCHED
    width = len(layout.sums)
    for bucket in buckets_:
        if bucket.partials is None or bucket.partials.shape[1] != width:  # kept with the bucket: no allocation per step
            bucket.partials = torch.empty(bucket.n_chunks, width, device=bucket.device,
                                          dtype=torch.float64 if bucket.dtype == torch.float64 else torch.float32)
        partials = bucket.partials
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

    def __init__(self, layout: PassLayout, layers: list[list[list[torch.Tensor]]], decays: list[float],
                 group_indices: list[int], chunk_plans: dict):
        self.layout = layout
        self.sizes = [len(group) for group in layers]
        self.group_indices = group_indices  # each group's position in param_groups (its row of hyperparameters)
        flat = [tensors for group in layers for tensors in group]
        flat_decays = [decay for group, decay in zip(layers, decays) for _ in group]
        self.buckets = buckets(flat, flat_decays, chunk_plans)
        self.grad_column = layout.lists.index("grad")  # the gradients' column of the address tables
        self.grad_strides = [tensors[self.grad_column].stride() for tensors in flat]  # what a rebound one must match
        self.n_layers = len(flat)
        self.n_elements = sum(tensors[0].numel() for tensors in flat)  # the parameters' elements (KOALA-M's E30)
        self._scalar_tables: ScalarTables | None = None
        self._sums: torch.Tensor | None = None  # every layer's sums, rewritten at each step
        self._state_tables: dict[str, torch.Tensor | None] = {}

    @property
    def reusable(self) -> bool:
        """No layer runs on copies (copies hold one step's values: such a batch is built every step)."""
        return not any(bucket.copies for bucket in self.buckets)

    def sums(self, kernel: str, device, dtype) -> list[torch.Tensor]:
        """Each group's ``[n_layers, len(layout.sums)]`` sums: views of one table for the whole step, which the
        batch keeps and rewrites at each step (read within the step)."""
        if self._sums is None or self._sums.dtype != dtype or self._sums.device != torch.device(device):
            self._sums = torch.empty(self.n_layers, len(self.layout.sums), dtype=dtype, device=device)
        return list(layer_sums(self.buckets, self._sums, self.layout, kernel).split(self.sizes))

    def scalar_step(self, kernel: str, hyperparameters: list[list[float]], stats: torch.Tensor,
                    state: dict, extra: tuple, **constants) -> tuple[torch.Tensor, torch.Tensor]:
        """A step's scalar part for every layer in one launch of ``kernel`` (one program,
        koala_hf.optim.triton_scalar_kernels), from this step's sums (:meth:`sums` first) and the measurement's
        ``stats``: returns the ``[n_layers, N_COEF]`` coefficients and the flag "step taken"; the filter-wide
        ``state`` (``R``, the counters, the loss) and the variant's ``extra`` state are written in place.
        ``hyperparameters``: a row per parameter group, uploaded at every step (a scheduler moves the lr)."""
        noise = state["R"]
        device = noise.device
        if self._scalar_tables is None:
            groups = [index for index, size in zip(self.group_indices, self.sizes) for _ in range(size)]
            self._scalar_tables = ScalarTables(
                upload(groups, device), torch.empty((), dtype=torch.bool, device=device),
                torch.empty(self.n_layers, len(self.layout.coefficients), dtype=noise.dtype, device=device))
        tables = self._scalar_tables
        triton_runtime.launch(triton_runtime.kernels().LAUNCHED[kernel], (1,), self._sums, tables.groups,
                              upload(hyperparameters, device, torch.float64), stats, noise, state["step"],
                              state["skipped_steps"], state["negative_loss_steps"], state["loss"], tables.ok,
                              tables.coefficients, self.n_layers, len(hyperparameters), *extra,
                              ACC=triton_dtype(noise.dtype), LAYERS=SCALAR_BLOCK, **stat_constants(),
                              **self.layout.triton_constants("sums", "coefficients"), **constants)
        return tables.coefficients, tables.ok

    def state_table(self, name: str, tensors: Callable[[], list[torch.Tensor]],
                    like: torch.Tensor) -> torch.Tensor | None:
        """An int64 table of the addresses of ``tensors()`` (a variant's per-layer state for its scalar kernel),
        or ``None`` where one is not in ``like``'s dtype and device (the kernel cannot read it); built once per
        batch: the state tensors do not move while the batch is kept."""
        if name not in self._state_tables:
            listed = tensors()
            readable = all(t.dtype == like.dtype and t.device == like.device for t in listed)
            self._state_tables[name] = upload([t.data_ptr() for t in listed], like.device) if readable else None
        return self._state_tables[name]

    def rebind_grads(self, grads: list[torch.Tensor]) -> bool:
        """Point the tables at this step's gradients (``grads``, in the batch's order of layers) where they moved
        since the batch was built, without Python per layer; ``False`` (the batch must be rebuilt) where one is laid
        out otherwise than the one it replaces."""
        if list(map(torch.Tensor.stride, grads)) != self.grad_strides:
            return False
        for bucket in self.buckets:
            bucket.rebind(self.grad_column, grads if len(self.buckets) == 1 else [grads[r] for r in bucket.rows])
        return True

    def update(self, kernel: str, coefficients: list[torch.Tensor], ok: torch.Tensor, *scalars) -> None:
        table = coefficients[0] if len(coefficients) == 1 else torch.cat(coefficients)
        update(self.buckets, self.layout, kernel, table, ok, *scalars)


def _addresses(step) -> tuple:
    """A step's identity for a batch where it has no fingerprint (sharded): its parameters' and gradients'
    addresses, and its states' (the state tensors a batch's address tables point to)."""
    return (tuple(p.data_ptr() for p in step.shards), tuple(g.data_ptr() for g in step.grads),
            tuple(map(id, step.states)))


class BatchCache:
    """Each layout's last :class:`StepBatch`, reused while the step's groups, weight decays, parameters (their
    fingerprints, koala_hf.optim.gather_cache) and the addresses of their gradients are those it was built for.
    Gradients set to ``None`` between steps may come back elsewhere: then the batch's tables are pointed at them
    (:meth:`StepBatch.rebind_grads`), and it is rebuilt only where anything else changed. The state tensors are
    the optimizer's own, replaced only when a state dict is loaded: :meth:`clear` then
    (``KoalaOptimizer.__setstate__``)."""

    def __init__(self) -> None:
        self._batches: dict[str, tuple[tuple, StepBatch]] = {}

    def clear(self) -> None:
        self._batches.clear()

    def get(self, layout: PassLayout, group_steps, chunk_plans: dict) -> StepBatch:
        # (the steps, their gradients' addresses): compared without Python per layer (the gather keeps the fingerprints)
        fingerprinted = all(step.fingerprint for step in group_steps)
        key = (tuple((step.index, step.weight_decay, step.fingerprint if step.fingerprint else _addresses(step))
                     for step in group_steps),
               tuple(step.grad_addresses for step in group_steps) if fingerprinted else None)
        kept = self._batches.get(layout.prefix)
        if kept is not None and kept[0][0] == key[0]:
            if kept[0][1] == key[1]:
                return kept[1]
            if fingerprinted and kept[1].rebind_grads(list(chain.from_iterable(step.grads for step in group_steps))):
                self._batches[layout.prefix] = (key, kept[1])
                return kept[1]
        batch = StepBatch(layout, [s.layers(layout) for s in group_steps], [s.weight_decay for s in group_steps],
                          [s.index for s in group_steps], chunk_plans)
        if batch.reusable:
            self._batches[layout.prefix] = (key, batch)
        else:
            self._batches.pop(layout.prefix, None)
        return batch


# The hyperparameters every scalar kernel reads (a row per group; HYPER_* their columns), with the sums computed
# as the torch paths compute them (in Python floats): E4's lr, E3's wd/2, E2's noise estimate, and the squared
# norm below which a layer is not updated. (Constants
# go in this float64 table too: a Triton constexpr float is a float32.)
NOISE_MODES = {"second_moment": 0.0, "variance": 1.0, "none": 2.0}  # E1a, E1b, E1c
COMMON_HYPERPARAMETERS = {"lr": lambda g: g["lr"], "half_decay": lambda g: 0.5 * g["weight_decay"],
                          "r": lambda g: math.nan if g["r"] is None else g["r"], "mode": lambda g: NOISE_MODES[g["noise"]],
                          "alpha_r": lambda g: g["alpha_r"], "one_minus_alpha_r": lambda g: 1.0 - g["alpha_r"],
                          "min_hh": lambda g: MIN_JACOBIAN_NORM**2}


def fused_scalar_step(optimizer, group_steps, reduction, inputs, kernel: str, hyperparameters: dict,
                      extra: Callable[[StepBatch], tuple], constants: dict,
                      per_layer_state: Callable[[], list[torch.Tensor]] | None = None):
    """A step's scalar part in one launch of ``kernel`` (koala_hf.optim.triton_scalar_kernels): the coefficient
    table and the flag "step taken", the state written in place (``inputs.recorded_by_kernel``).

    ``hyperparameters``: the variant's columns after :data:`COMMON_HYPERPARAMETERS`; ``extra(batch)``: the
    variant's own kernel arguments; ``per_layer_state()``: its per-layer scalar state, whose table of addresses
    goes before them, and which must be in the step's arithmetic dtype. ``None`` where the step is not all on
    the Triton kernels, is sharded (its sums need the collective first), keeps per-layer state in another dtype
    (float32 and float64 parameters mixed), measured its loss on another device, or has a tensor lr: then
    torch computes it."""
    batch = reduction.plans.get(Backend.TRITON)
    if batch is None or any(step.backend is not Backend.TRITON or step.sharded for step in group_steps):
        return None
    noise = inputs.state["R"]
    if any(isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups) or inputs.stats.device != noise.device:
        return None
    state_table = ()
    if per_layer_state is not None:
        table = batch.state_table("per_layer_state", per_layer_state, noise)
        if table is None:
            return None
        state_table = (table,)
    columns = {**COMMON_HYPERPARAMETERS, **hyperparameters}
    rows = [[float(read(group)) for read in columns.values()] for group in optimizer.param_groups]
    positions = {"N_HYPER": len(columns), **{f"HYPER_{name.upper()}": i for i, name in enumerate(columns)}}
    result = batch.scalar_step(kernel, rows, inputs.stats, inputs.state, state_table + extra(batch), **positions,
                               **constants)
    inputs.recorded_by_kernel()
    return result
