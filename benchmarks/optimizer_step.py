"""Median optimizer-step time and state memory: every KOALA implementation path against torch AdamW.

    python benchmarks/optimizer_step.py                 # CPU, or the GPU when there is one
    python benchmarks/optimizer_step.py --steps 30 --device cuda

Parameter shapes: (a) the WikiText-2 recipe's ``paper`` GPT (4 layers, width 768,
context 256, the classic 33,278-word vocabulary: 54M parameters), (b) ResNet-50
(timm, CIFAR stem, 100 classes: 161 tensors) and (c) Swin-T (timm, 32x32 inputs:
173 tensors, 108 of them LayerNorm and bias vectors). Gradients are random; every step observes a
loss first, as training does. Reference: torch AdamW foreach (and fused where
torch has it). On a GPU it also checks that a KOALA step never synchronises
with the host (``torch.cuda.set_sync_debug_mode("error")``) and reports the
achieved memory bandwidth of KOALA++ (11 tensor passes per element, the floor)
as a fraction of the measured device-to-device copy bandwidth. For every
implementation it reports the first step's time (for the fused path: the
``torch.compile`` time) and, from the profiler, the operations one step
dispatches: on CPU the ops launched directly by ``step()`` (each a loop over
memory; a compiled graph counts as one call), on CUDA the device kernels.

Writes ``benchmarks/results/optimizer_step_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from koala_hf import KOALAM, KOALAV, KOALAPlusPlus  # noqa: E402
from run_support import provenance, write_report  # noqa: E402

# Tensor passes per element of a step at the memory-traffic floor (spec, cost notes; issue 7).
KOALA_PP_PASSES = 11
ADAMW_PASSES = 7


def lm_paper_shapes() -> list[torch.Size]:
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(vocab_size=33278, n_positions=256, n_embd=768, n_layer=4, n_head=12))
    return [p.shape for p in model.parameters()]


def swin_tiny_shapes() -> list[torch.Size]:
    from koala_hf.vision import create_model

    with torch.device("meta"):
        model = create_model("swin_tiny_cifar", num_classes=10)
    return [p.shape for p in model.parameters()]


def resnet50_shapes() -> list[torch.Size]:
    from koala_hf.vision import create_model

    with torch.device("meta"):
        model = create_model("resnet50_cifar", num_classes=100)
    return [p.shape for p in model.parameters()]


def implementations() -> dict:
    """name -> optimizer factory over a parameter list (the papers' LM settings where they matter)."""
    table = {
        "AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=True),
        "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, fused=True),
        "KOALA++ per-tensor": lambda ps: KOALAPlusPlus(ps, lr=2e-3, weight_decay=1e-4, foreach=False),
        "KOALA++ foreach": lambda ps: KOALAPlusPlus(ps, lr=2e-3, weight_decay=1e-4, foreach=True),
        "KOALA++ fused (torch.compile)": lambda ps: KOALAPlusPlus(ps, lr=2e-3, weight_decay=1e-4, fused=True),
        "KOALA-V per-tensor": lambda ps: KOALAV(ps, weight_decay=1e-4, foreach=False),
        "KOALA-V foreach": lambda ps: KOALAV(ps, weight_decay=1e-4, foreach=True),
        "KOALA-M per-tensor": lambda ps: KOALAM(ps, weight_decay=1e-4, foreach=False),
        "KOALA-M foreach": lambda ps: KOALAM(ps, weight_decay=1e-4, foreach=True),
    }
    return table


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(make, shapes, device: str, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = make(params)
    koala = hasattr(optimizer, "observe")
    loss = torch.tensor(3.0, device=device)
    times = []
    for i in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        if koala:
            optimizer.observe(loss)
        optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    first, times = times[0], times[warmup:]
    state_bytes = sum(
        t.numel() * t.element_size()
        for key, state in optimizer.state.items() if isinstance(key, torch.Tensor)
        for t in state.values() if isinstance(t, torch.Tensor) and t.numel() > 1
    )
    result = {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "state_bytes": state_bytes,
              "first_step_s": first, "ops_per_step": ops_per_step(optimizer, loss, koala, device)}
    if device == "cuda" and koala:
        try:
            torch.cuda.set_sync_debug_mode("error")
            optimizer.observe(loss)
            optimizer.step()
            result["no_host_sync"] = True
        except RuntimeError:
            result["no_host_sync"] = False
        finally:
            torch.cuda.set_sync_debug_mode(0)
    del optimizer, params
    gc.collect()
    return result


def ops_per_step(optimizer, loss, koala: bool, device: str) -> int:
    """Operations one ``step()`` dispatches (profiler): device kernels on CUDA; on CPU the ops called directly
    inside ``Optimizer.step`` (a compiled graph's call counts once, its loops inside it do not)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        if koala:
            optimizer.observe(loss)
        optimizer.step()
        synchronize(device)
    events = prof.events()
    if device == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    steps = {id(e) for e in events if e.name.startswith("Optimizer.step#")}
    return sum(1 for e in events if e.cpu_parent is not None and id(e.cpu_parent) in steps)


def copy_bandwidth(device: str, megabytes: int = 512) -> float:
    """Measured read+write bandwidth of a large device-to-device copy, bytes/s."""
    source = torch.empty(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    synchronize(device)
    start = time.perf_counter()
    repeats = 10
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    return 2 * source.numel() * 4 * repeats / (time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="implementation names to run (default: all)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    workloads = {"(a) LM paper GPT": lm_paper_shapes(), "(b) ResNet-50": resnet50_shapes(), "(c) Swin-T": swin_tiny_shapes()}
    bandwidth = copy_bandwidth(args.device)
    rows = []
    for workload, shapes in workloads.items():
        n = sum(s.numel() for s in shapes)
        for name, make in implementations().items():
            if args.only and name not in args.only:
                continue
            try:
                measured = time_steps(make, shapes, args.device, args.steps, args.warmup)
            except (RuntimeError, TypeError) as error:  # e.g. no fused AdamW for this device
                print(f"{workload}: {name}: not available ({error})".splitlines()[0])
                continue
            passes = KOALA_PP_PASSES if name.startswith("KOALA++") else ADAMW_PASSES if name.startswith("AdamW") else None
            if passes:
                measured["bandwidth_fraction"] = passes * n * 4 / (measured["median_ms"] / 1e3) / bandwidth
            rows.append({"workload": workload, "parameters": n, "implementation": name, **measured})
            print(f"{workload:18s} {name:30s} {measured['median_ms']:9.2f} ms  state {measured['state_bytes'] / 2**20:8.1f} MiB")

    for row in rows:
        baseline = next((r for r in rows if r["workload"] == row["workload"] and r["implementation"] == "AdamW foreach"), None)
        fused = next((r for r in rows if r["workload"] == row["workload"] and r["implementation"] == "AdamW fused"), None)
        row["vs_adamw_foreach"] = row["median_ms"] / baseline["median_ms"] if baseline else None
        row["vs_adamw_fused"] = row["median_ms"] / fused["median_ms"] if fused else None
    report = {
        "benchmark": "optimizer_step",
        "torch": torch.__version__,
        **provenance(__file__, argv, args.device),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "steps": args.steps,
        "rows": rows,
    }
    write_report(args.output, f"optimizer_step_{args.device}", report, markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [
        f"Optimizer step, {report['device']} (torch {report['torch']}), {report['date']}: `{report['command']}`",
        f"(median of {report['steps']} steps; copy bandwidth {report['copy_bandwidth_gb_s']:.1f} GB/s)",
        "",
        "| shapes | implementation | median ms | x AdamW foreach | x AdamW fused | state MiB | of copy bandwidth | ops per step | first step s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        ratio = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        share = f"{100 * r['bandwidth_fraction']:.0f}%" if r.get("bandwidth_fraction") else "-"
        lines.append(f"| {r['workload']} | {r['implementation']} | {r['median_ms']:.1f} | {ratio(r['vs_adamw_foreach'])} | "
                     f"{ratio(r['vs_adamw_fused'])} | {r['state_bytes'] / 2**20:.0f} | {share} | {r['ops_per_step']} | "
                     f"{r['first_step_s']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
