"""What one optimizer step dispatches: its ATen compute ops and its Triton launches.

The count needs no GPU: :func:`step_dispatches` builds parameters of the given shapes under
``torch._subclasses.fake_tensor.FakeTensorMode`` on ``device`` (``"cuda"`` by default), takes warm-up steps and
then counts one step's ops in a ``TorchDispatchMode``. Ops that only describe or reshape a tensor (views,
``detach``, device queries) are left out. A multi-tensor (``_foreach_*``) op on CUDA counts as the kernels it
launches (:func:`multi_tensor_launches`): one on torch's fast route, one per tensor where torch falls back to a
loop over the tensors. On fake tensors the Triton kernels cannot run, so their launches
(koala_hf.optim.triton_runtime.launch) are counted instead of run. A copy of a fake device tensor to the host
(one synchronisation on a real device) is counted as ``host_copies`` and arrives as ones
(:class:`AnswerHostReads`).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

from koala_hf.optim import triton_runtime


def counts_as_compute(func) -> bool:
    """An op that computes or moves data: not a view, not ``detach``/``alias``, not a ``prim`` device query."""
    return not (func.is_view or func.namespace == "prim" or func.__name__.split(".")[0] in ("detach", "alias", "lift_fresh"))


def _dense(t: torch.Tensor) -> bool:
    """Strided, non-overlapping and dense: its elements fill one block of memory, in some order of the dims."""
    if t.layout != torch.strided:
        return False
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and all(size == 1 or sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride()))


def multi_tensor_launches(func, args: tuple) -> int:
    """The CUDA kernels a ``_foreach_*`` op launches: 1 when torch can take its fast route, else one per tensor.

    The fast route (ATen's ``check_fast_path_restrictions``) needs every tensor of every list on one device,
    strided and dense, each list of one dtype (and of the first list's, except for ``_foreach_copy_``), and
    corresponding tensors of equal sizes and strides. Otherwise torch loops over the tensors, one kernel each:
    for instance for a list of per-layer 0-d coefficients beside parameter-shaped tensors. Ops off CUDA count 1.
    """
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a)]
    if not lists or lists[0][0].device.type != "cuda":
        return 1
    first = lists[0]
    device, dtype = first[0].device, first[0].dtype
    cross_dtype = func.overloadpacket.__name__.startswith("_foreach_copy")
    for tensors in lists:
        list_dtype = tensors[0].dtype
        if not all(t.device == device and t.dtype == list_dtype and _dense(t) for t in tensors):
            return len(first)
        if list_dtype != dtype and not cross_dtype:
            return len(first)
        if tensors is not first and not all(_same_layout(a, b) for a, b in zip(first, tensors)):
            return len(first)
    return 1


class CountOps(TorchDispatchMode):
    """Counts the compute ops dispatched inside it, by name (a multi-tensor op as the kernels it launches)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if counts_as_compute(func):
            name = str(func.overloadpacket.__name__)
            self.ops[name] += multi_tensor_launches(func, args) if name.startswith("_foreach") else 1
        return func(*args, **(kwargs or {}))


class AnswerHostReads(TorchDispatchMode):
    """A fake tensor copied to the host arrives as a real tensor of 1, 2, 3, ..., where a real step would read
    what the device computed: the foreach step off the CPU reads its coefficients to the host in one copy
    (koala_hf.optim.host_coefficients) and, on fake tensors, then takes the path of a step that is ok, every
    coefficient a different number (the most ops: no shortcut for numbers shared by every layer). The copy is
    counted (it is one op, and ``copies``); reading the host tensor's values dispatches nothing."""

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = args[0] if args else None
        if (func is torch.ops.aten._to_copy.default and isinstance(source, FakeTensor) and source.device.type != "cpu"
                and torch.device(kwargs.get("device") or source.device).type == "cpu"):
            self.copies += 1
            with unset_fake_temporarily():
                values = torch.arange(1, source.numel() + 1, dtype=torch.float64).reshape(source.shape)
                return values.to(kwargs.get("dtype") or source.dtype)
        return func(*args, **kwargs)


@dataclass
class Launch:
    """One Triton launch of a step: the kernel's name, its arguments and its compile-time constants."""

    kernel: str
    arguments: tuple
    constants: dict


@contextlib.contextmanager
def recording_launches(run: bool = True):
    """Record the Triton launches inside it as :class:`Launch` records (``run=False``: without launching, for
    fake tensors)."""
    launches: list[Launch] = []
    real = triton_runtime.launch

    def recorded(kernel, grid, *args, **constants):
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
        launches.append(Launch(name, args, constants))
        if run:
            real(kernel, grid, *args, **constants)

    triton_runtime.launch = recorded
    try:
        yield launches
    finally:
        triton_runtime.launch = real


@contextlib.contextmanager
def counting_launches(run: bool = True):
    """The names of the Triton launches inside it, in order (``run=False``: counted without launching)."""
    names: list[str] = []
    with recording_launches(run) as launches:
        yield names
        names.extend(launch.kernel for launch in launches)


@dataclass
class StepDispatches:
    ops: int  # ATen compute ops of one step
    launches: int  # Triton launches of one step
    by_op: Counter
    host_copies: int = 0  # copies of a device tensor to the host (each a synchronisation on a real device)


def step_dispatches(make_optimizer: Callable, shapes: list[tuple[int, ...]], *, device: str = "cuda",
                    dtype: torch.dtype = torch.float32, koala: bool | None = None, warmup: int = 2) -> StepDispatches:
    """Ops and launches of one step of ``make_optimizer(params)`` over fake parameters of ``shapes``.

    ``koala``: the optimizer needs ``observe(loss)`` before its step (``None``: whether it has ``observe``; the
    optimizer is built on the fake CUDA parameters, so a CUDA-only path builds too). Warm-up steps first (KOALA-M's first step
    differs, state is created), then one counted step.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fake tensors' data_ptr() reads as 0, with a deprecation warning
        with FakeTensorMode(allow_non_fake_inputs=True), AnswerHostReads() as host_reads:
            params = [torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype)) for shape in shapes]
            optimizer = make_optimizer(params)
            if koala is None:
                koala = hasattr(optimizer, "observe")

            def step(counter=None):
                for p in params:
                    p.grad = torch.empty_like(p)
                context = counter if counter is not None else contextlib.nullcontext()
                with context:
                    if koala:
                        optimizer.observe(torch.ones((), device=device))
                    optimizer.step()

            with counting_launches(run=False):
                for _ in range(warmup):
                    step()
            with counting_launches(run=False) as launches:
                counter = CountOps()
                copies_before = host_reads.copies
                step(counter)
    return StepDispatches(sum(counter.ops.values()), len(launches), counter.ops, host_reads.copies - copies_before)


def python_calls(fn: Callable[[], object]) -> int:
    """How many calls ``fn()`` makes at the Python level: Python functions, and C functions called from Python code
    (a call made from C, as ``map`` makes, is not seen). A step whose count grows with its layers runs Python per
    layer: host time a GPU waits for."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    previous = sys.getprofile()
    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(previous)
    return calls
