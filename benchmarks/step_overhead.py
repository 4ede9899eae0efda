"""What a step costs the host, without a GPU: its dispatches on CUDA, and its host time as launches recorded.

    python benchmarks/step_overhead.py                       # GPT-2 124M and 355M tensor counts (148, 292)
    python benchmarks/step_overhead.py --tensors 4 --steps 3 --output /tmp/overhead   # a check

On a GPU a KOALA step is host-bound when Python and the op dispatcher take longer than the kernels they
launch. Both parts are measured here on a CPU, per number of tensors:

- **dispatches**: the ATen compute ops and Triton launches one step would dispatch on CUDA, counted on fake
  CUDA tensors (koala_hf.optim.profiling), at GPT-2's real shapes; a multi-tensor op counts as the kernels it
  launches (one on torch's fast route, one per tensor on its slow route).
- **Python calls**: of one step, at the Python level (koala_hf.optim.profiling.python_calls): they grow with
  the tensors where a step runs Python per tensor, and they do not depend on the machine's load.
- **host ms**: the lowest of ``--repeats`` medians of the wall time of ``observe`` + ``step()`` over
  ``--steps`` steps, the repeats rounds over the whole table (the lowest, so that another process's burst on
  this shared machine does not count), on CPU tensors of 4 elements each (as many as the model's tensors),
  so that the arithmetic is negligible and what is timed is
  the step's Python and dispatch: the part a GPU cannot speed up. KOALA runs its device paths: the Triton
  step with its launches recorded and not run (koala_hf.optim.profiling.recording_launches; no interpreter),
  and the foreach step as off the CPU: multi-tensor sums, its coefficients copied to the host once and applied
  as scalar lists (``PER_LAYER_SUMS``, ``HOST_READABLE`` and ``host_coefficients.DEVICE_COEFFICIENTS``
  emptied). A CPU dispatches a small op in a few microseconds, about what CUDA's launch
  path costs the host, so the times approximate a GPU step's host time, not its device time.

Writes ``benchmarks/results/host_step_overhead_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton step may run on CPU tensors (its launches are not run)

import torch  # noqa: E402

from koala_hf import KOALAM, KOALAV, KOALAPlusPlus  # noqa: E402
from koala_hf.optim import host_coefficients, layers  # noqa: E402
from koala_hf.optim.profiling import python_calls, recording_launches, step_dispatches  # noqa: E402
from koala_hf.recipe_support.results import provenance, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ELEMENTS = 4  # per tensor, for the host time

IMPLEMENTATIONS = {
    "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, fused=True),
    "AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=True),
    "KOALA++ triton": lambda ps: KOALAPlusPlus(ps, lr=2e-3, weight_decay=1e-4, fused="triton"),
    "KOALA-V triton": lambda ps: KOALAV(ps, weight_decay=1e-4, fused="triton"),
    "KOALA-M triton": lambda ps: KOALAM(ps, weight_decay=1e-4, fused="triton"),
    "KOALA++ foreach": lambda ps: KOALAPlusPlus(ps, lr=2e-3, weight_decay=1e-4, foreach=True),
    "KOALA-V foreach": lambda ps: KOALAV(ps, weight_decay=1e-4, foreach=True),
    "KOALA-M foreach": lambda ps: KOALAM(ps, weight_decay=1e-4, foreach=True),
}
# Host time where every step's gradients are new tensors at new addresses (as zero_grad(set_to_none=True) can
# leave them): the Triton step's kept tables are pointed at them.
MOVED_GRADIENTS = {"KOALA++ triton, gradients moved every step": IMPLEMENTATIONS["KOALA++ triton"]}
ROWS = {**IMPLEMENTATIONS, **MOVED_GRADIENTS}


def gpt2_shapes(width: int, depth: int, vocab: int = 50257, context: int = 1024) -> list[tuple[int, ...]]:
    """GPT-2's parameter shapes (tied head): embeddings, per block 2 LayerNorms, attention and MLP, final norm."""
    block = [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,),
             (width,), (width,), (width, 4 * width), (4 * width,), (4 * width, width), (width,)]
    return [(vocab, width), (context, width)] + block * depth + [(width,), (width,)]


WORKLOADS = {"GPT-2 124M": lambda: gpt2_shapes(768, 12), "GPT-2 355M": lambda: gpt2_shapes(1024, 24)}


@contextlib.contextmanager
def as_on_a_device():
    """The KOALA paths a GPU takes, on CPU tensors: multi-tensor sums, nothing read for free, the foreach
    update's coefficients copied to the host."""
    saved = layers.HOST_READABLE, layers.PER_LAYER_SUMS, host_coefficients.DEVICE_COEFFICIENTS
    layers.HOST_READABLE, layers.PER_LAYER_SUMS, host_coefficients.DEVICE_COEFFICIENTS = (), (), ()
    try:
        yield
    finally:
        layers.HOST_READABLE, layers.PER_LAYER_SUMS, host_coefficients.DEVICE_COEFFICIENTS = saved


class HostCost(NamedTuple):
    ms: float  # median wall time of a step
    python_calls: int  # Python-level calls of one step (koala_hf.optim.profiling.python_calls)


def host_cost(make, n_tensors: int, steps: int, warmup: int = 3, move_gradients: bool = False) -> HostCost:
    """The median ms of ``observe`` + ``step()`` over ``steps`` steps on ``n_tensors`` CPU tensors of ELEMENTS
    elements each, and the Python calls of one more step. ``move_gradients``: new gradient tensors before every
    step, all kept alive so that none lands where an earlier one was (made outside the timed part)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(ELEMENTS)) for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = make(params)
    koala = hasattr(optimizer, "observe")
    times = []
    with as_on_a_device(), recording_launches(run=False):
        held = []  # every gradient set so far, alive

        def new_gradients():
            if move_gradients:
                held.append([torch.randn_like(p) for p in params])
                for p, g in zip(params, held[-1]):
                    p.grad = g

        for k in range(warmup + steps):
            new_gradients()
            start = time.perf_counter()
            if koala:
                optimizer.observe(torch.tensor(1.0))
            optimizer.step()
            times.append(time.perf_counter() - start)
        new_gradients()
        calls = python_calls(lambda: (optimizer.observe(torch.tensor(1.0)) if koala else None, optimizer.step()))
    return HostCost(statistics.median(times[warmup:]) * 1e3, calls)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of --steps steps; the lowest median counts")
    parser.add_argument("--tensors", type=int, nargs="*", help="tensor counts instead of GPT-2's (any shapes)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    workloads = ({f"{n} tensors": (lambda n=n: [(3, 4)] * n) for n in args.tensors} if args.tensors else WORKLOADS)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for workload, shapes_of in workloads.items():
            shapes = shapes_of()
            for name, make in ROWS.items():
                counted = step_dispatches(make, shapes)
                host = host_cost(make, len(shapes), args.steps, move_gradients=name in MOVED_GRADIENTS)
                rows.append({"workload": workload, "tensors": len(shapes), "implementation": name,
                             "cuda_aten_ops": counted.ops, "cuda_triton_launches": counted.launches,
                             "cuda_host_copies": counted.host_copies, "host_ms": host.ms,
                             "host_python_calls": host.python_calls})
                print(f"{workload:12s} {name:16s} {counted.ops:5d} + {counted.launches} ({counted.host_copies} to the host) "
                      f"{host.ms:8.3f} ms {host.python_calls:6d} Python calls")
        for _ in range(args.repeats - 1):  # more rounds over the whole table: each row keeps its lowest median
            for row in rows:
                name = row["implementation"]
                again = host_cost(ROWS[name], row["tensors"], args.steps, move_gradients=name in MOVED_GRADIENTS)
                row["host_ms"] = min(row["host_ms"], again.ms)
    for row in rows:
        fused = next(r for r in rows if r["workload"] == row["workload"] and r["implementation"] == "AdamW fused")
        foreach = next(r for r in rows if r["workload"] == row["workload"] and r["implementation"] == "AdamW foreach")
        row["host_vs_adamw_fused"] = row["host_ms"] / fused["host_ms"]
        row["ops_vs_adamw_foreach"] = row["cuda_aten_ops"] / foreach["cuda_aten_ops"]
    report = {"benchmark": "host_step_overhead", "torch": torch.__version__, **provenance(__file__, argv, "cpu", root=ROOT),
              "steps": args.steps, "repeats": args.repeats, "elements_per_tensor": ELEMENTS, "rows": rows}
    write_report(args.output, "host_step_overhead_cpu", report, markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"Step overhead without a GPU, {report['device']} (torch {report['torch']}), {report['date']}: "
             f"`{report['command']}`",
             f"(CUDA dispatches counted on fake CUDA tensors at the real shapes, a multi-tensor op as the kernels it "
             f"launches: one on torch's fast route, one per tensor on its slow route; host time: the lowest of "
             f"{report['repeats']} medians of {report['steps']} "
             f"steps on CPU tensors of {report['elements_per_tensor']} elements, Triton launches recorded, not run; "
             f"copies to the host: each one a synchronisation on a GPU; Python calls: of one step, the functions and "
             f"the builtins called from Python code, which grow where a step runs Python per tensor)", "",
             "| shapes | tensors | implementation | CUDA: ATen ops + Triton launches | x AdamW foreach ops | "
             "copies to the host | host ms | x AdamW fused host | Python calls |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['workload']} | {r['tensors']} | {r['implementation']} | {r['cuda_aten_ops']} + "
                     f"{r['cuda_triton_launches']} | {r['ops_vs_adamw_foreach']:.2f} | {r['cuda_host_copies']} | "
                     f"{r['host_ms']:.3f} | {r['host_vs_adamw_fused']:.1f} | {r['host_python_calls']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
