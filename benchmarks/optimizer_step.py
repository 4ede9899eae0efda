"""Median optimizer-step time and state memory: every KOALA implementation path against torch AdamW.

    python benchmarks/optimizer_step.py                 # CPU, or the GPU when there is one
    python benchmarks/optimizer_step.py --steps 30 --device cuda
    python benchmarks/optimizer_step.py --device cuda --workloads gpt2-124m gpt2-355m --dtype bfloat16

Parameter shapes (``--workloads``, by default the first three): (a) ``lm-paper``, the WikiText-2 recipe's
``paper`` GPT (4 layers, width 768, context 256, the classic 33,278-word vocabulary: 54M parameters), (b)
``resnet50``, ResNet-50 (timm, CIFAR stem, 100 classes: 161 tensors), (c) ``swin-t``, Swin-T (timm, 32x32
inputs: 173 tensors, 108 of them LayerNorm and bias vectors), (d) ``gpt2-124m`` and (e) ``gpt2-355m``, GPT-2's
124M and 355M models (148 and 292 tensors). ``--dtype`` is the parameters', gradients' and state's dtype. Gradients are random; every step observes a
loss first, as training does. Reference: torch AdamW foreach (and fused where
torch has it). ``fused`` is ``fused=True``: the C++ kernels on the CPU, the
Triton kernels on CUDA (where the ``triton`` rows, ``fused="triton"``, are the
same backend asked for by name). On a GPU it also records whether a KOALA step
synchronises with the host (``torch.cuda.set_sync_debug_mode("error")``; the
foreach path does, once, to read its coefficients: koala_hf.optim.host_coefficients)
and reports the achieved memory bandwidth of KOALA++ (11 tensor passes per
element, the floor) as a fraction of the measured device-to-device copy
bandwidth. For every implementation it reports the first step's time (on a GPU
for the Triton kernels: their compilation) and, from the profiler, the
operations one step dispatches: on CPU the ops launched directly by ``step()``
(a multi-tensor op counts as one call, the loops inside it do not), on CUDA the
device kernels. Whatever the device, it also counts what one step would
dispatch on CUDA, without a GPU: the ATen compute ops and the Triton launches on
fake CUDA tensors (koala_hf.optim.profiling; a multi-tensor op counts as the
kernels it launches: one on torch's fast route, one per tensor on its slow
route). On the CPU it also times the
first-use build of the fused path's C++ kernels in a fresh extension folder
(koala_hf.optim.cpu_kernels).

Implementations are timed interleaved, one step each in turn, so that a slow
phase of a shared machine slows all of them alike. A "floor" row adds to AdamW
fused a pass that only reads the four tensors KOALA++'s reduction reads: a
KOALA++ step needs that pass on top of an AdamW-like update pass, so on a
machine where reading costs about as much as AdamW's read-modify-write pass,
the floor is near 2x AdamW fused, not 11/7.

Writes ``benchmarks/results/optimizer_step_<device>.json`` and ``.md`` (``optimizer_step_<device>_bf16`` ... for
another ``--dtype``).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from koala_hf import KOALAM, KOALAV, KOALAPlusPlus
from koala_hf.optim.profiling import step_dispatches
from koala_hf.recipe_support.results import provenance, write_report

ROOT = Path(__file__).resolve().parents[1]

# Tensor passes per element of a step at the memory-traffic floor (spec, cost notes; issue 7).
KOALA_PP_PASSES = 11
ADAMW_PASSES = 7


def lm_paper_shapes() -> list[torch.Size]:
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(vocab_size=33278, n_positions=256, n_embd=768, n_layer=4, n_head=12))
    return [p.shape for p in model.parameters()]


def gpt2_shapes(width: int, layers: int, heads: int) -> list[torch.Size]:
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=layers, n_head=heads))
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


WORKLOADS = {  # --workloads name -> (row label, shapes)
    "lm-paper": ("(a) LM paper GPT", lm_paper_shapes),
    "resnet50": ("(b) ResNet-50", resnet50_shapes),
    "swin-t": ("(c) Swin-T", swin_tiny_shapes),
    "gpt2-124m": ("(d) GPT-2 124M", lambda: gpt2_shapes(768, 12, 12)),
    "gpt2-355m": ("(e) GPT-2 355M", lambda: gpt2_shapes(1024, 24, 16)),
    "tiny": ("tiny (a check of the script)", lambda: [torch.Size(s) for s in ((64, 32), (32,), (16, 3, 3, 3), (1,))]),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ReadPass:
    """Not an optimizer: one pass that only reads four parameter-sized tensors (two ``torch.dot`` per layer).

    KOALA++'s reduction pass reads the same four tensors (theta, g, v, H_prev), so AdamW fused plus this
    pass is what a KOALA++ step costs at best on a machine (the floor row), whatever reads cost there.
    """

    def __init__(self, params):
        self.state = {}
        self.pairs = [(p.view(-1), p.grad.view(-1), torch.randn_like(p).view(-1), torch.randn_like(p).view(-1))
                      for p in params]

    def step(self):
        with torch.profiler.record_function("Optimizer.step#ReadPass.step"):
            for p, g, v, h_prev in self.pairs:
                torch.dot(p, g)
                torch.dot(v, h_prev)


READ_PASS = "read 4 tensors once (2 torch.dot per layer)"
FLOOR = "KOALA++ floor: AdamW fused + that read pass"


def implementations(device: str) -> dict:
    """name -> optimizer factory over a parameter list (the papers' LM settings where they matter). The Triton
    rows run on CUDA, and on the CPU only under Triton's interpreter (for checks at a tiny size, not timing)."""
    table = {
        "AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=True),
        "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, fused=True),
        "KOALA++ per-tensor": lambda ps: KOALAPlusPlus(ps, lr=2e-3, weight_decay=1e-4, foreach=False),
        "KOALA++ foreach": lambda ps: KOALAPlusPlus(ps, lr=2e-3, weight_decay=1e-4, foreach=True),
        "KOALA++ fused": lambda ps: KOALAPlusPlus(ps, lr=2e-3, weight_decay=1e-4, fused=True),
        "KOALA-V per-tensor": lambda ps: KOALAV(ps, weight_decay=1e-4, foreach=False),
        "KOALA-V foreach": lambda ps: KOALAV(ps, weight_decay=1e-4, foreach=True),
        "KOALA-V fused": lambda ps: KOALAV(ps, weight_decay=1e-4, fused=True),
        "KOALA-M per-tensor": lambda ps: KOALAM(ps, weight_decay=1e-4, foreach=False),
        "KOALA-M foreach": lambda ps: KOALAM(ps, weight_decay=1e-4, foreach=True),
        "KOALA-M fused": lambda ps: KOALAM(ps, weight_decay=1e-4, fused=True),
        READ_PASS: ReadPass,
    }
    if device == "cuda" or (device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):  # CPU: to check the rows
        table["KOALA++ triton"] = lambda ps: KOALAPlusPlus(ps, lr=2e-3, weight_decay=1e-4, fused="triton")
        table["KOALA-V triton"] = lambda ps: KOALAV(ps, weight_decay=1e-4, fused="triton")
        table["KOALA-M triton"] = lambda ps: KOALAM(ps, weight_decay=1e-4, fused="triton")
    return table


def cuda_dispatches(make, shapes, dtype: torch.dtype = torch.float32) -> dict:
    """ATen compute ops and Triton launches of one step on CUDA, counted on fake tensors (no GPU needed)."""
    if make is ReadPass:
        return {}
    counted = step_dispatches(make, [tuple(s) for s in shapes], device="cuda", dtype=dtype)
    return {"cuda_aten_ops": counted.ops, "cuda_triton_launches": counted.launches}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(implementations: dict, shapes, device: str, steps: int, warmup: int,
               dtype: torch.dtype = torch.float32) -> dict[str, dict]:
    """Time every implementation's steps interleaved, step by step, on its own parameters and gradients.

    Interleaving makes a slow phase of the machine (another tenant, frequency changes) slow every
    implementation alike, so the ratios between them hold within one run even when the times drift. Every
    implementation starts from the same parameters and gradients and takes the same steps, so each KOALA
    path's parameters are also compared with its variant's per-tensor path (``vs_per_tensor``, relative).
    """
    runs = {}
    for name, make in implementations.items():
        torch.manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s, device=device) * 0.02).to(dtype)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        try:
            runs[name] = (params, make(params))
        except (RuntimeError, TypeError) as error:  # e.g. no fused AdamW for this device
            print(f"{name}: not available ({error})".splitlines()[0])
    loss = torch.tensor(3.0, device=device)
    times = {name: [] for name in runs}
    for _ in range(warmup + steps):
        for name, (_, optimizer) in runs.items():
            synchronize(device)
            start = time.perf_counter()
            if hasattr(optimizer, "observe"):
                optimizer.observe(loss)
            optimizer.step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    results = {}
    for name, (params, optimizer) in runs.items():
        koala = hasattr(optimizer, "observe")
        reference = runs.get(name.rsplit(" ", 1)[0] + " per-tensor") if koala else None
        if koala and int(optimizer.state["koala"]["skipped_steps"]) != 0:
            raise RuntimeError(f"{name} skipped steps: its times would not be those of a step")
        measured = times[name][warmup:]
        state_bytes = sum(
            t.numel() * t.element_size()
            for key, state in optimizer.state.items() if isinstance(key, torch.Tensor)
            for t in state.values() if isinstance(t, torch.Tensor) and t.numel() > 1
        )
        result = {"median_ms": 1e3 * statistics.median(measured), "min_ms": 1e3 * min(measured),
                  "state_bytes": state_bytes, "first_step_s": times[name][0],
                  "ops_per_step": ops_per_step(optimizer, loss, koala, device),
                  **cuda_dispatches(implementations[name], shapes, dtype)}
        if reference is not None:  # the same steps from the same start: how far from the per-tensor path
            result["vs_per_tensor"] = max(((p - q).abs().max() / q.abs().max().clamp_min(1e-30)).item()
                                          for p, q in zip(params, reference[0]))
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
        results[name] = result
    del runs
    gc.collect()
    return results


def ops_per_step(optimizer, loss, koala: bool, device: str) -> int:
    """Operations one ``step()`` dispatches (profiler): device kernels on CUDA; on CPU the ops called directly
    inside ``Optimizer.step`` (a multi-tensor op or a compiled graph's call counts once, its loops do not)."""
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


def cpu_kernel_build_seconds() -> float:
    """Seconds the fused path's first use spends building its C++ CPU kernels on a machine without the build."""
    code = ("import time; from koala_hf.optim.cpu_kernels import cpu_kernels; start = time.perf_counter(); "
            "assert cpu_kernels() is not None; print(time.perf_counter() - start)")
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TORCH_EXTENSIONS_DIR": folder},
                              capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--workloads", nargs="+", default=["lm-paper", "resnet50", "swin-t"], choices=list(WORKLOADS))
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    workloads = {WORKLOADS[name][0]: WORKLOADS[name][1]() for name in args.workloads}
    dtype = DTYPES[args.dtype]
    bandwidth = copy_bandwidth(args.device)
    build_s = cpu_kernel_build_seconds() if args.device == "cpu" else None
    rows = []
    for workload, shapes in workloads.items():
        n = sum(s.numel() for s in shapes)
        chosen = {name: make for name, make in implementations(args.device).items() if not args.only or name in args.only}
        for name, measured in time_steps(chosen, shapes, args.device, args.steps, args.warmup, dtype).items():
            passes = KOALA_PP_PASSES if name.startswith("KOALA++") else ADAMW_PASSES if name.startswith("AdamW") else None
            if passes:
                measured["bandwidth_fraction"] = passes * n * dtype.itemsize / (measured["median_ms"] / 1e3) / bandwidth
            rows.append({"workload": workload, "parameters": n, "implementation": name, **measured})
            print(f"{workload:18s} {name:30s} {measured['median_ms']:9.2f} ms  state {measured['state_bytes'] / 2**20:8.1f} MiB")
        parts = {r["implementation"]: r for r in rows if r["workload"] == workload and r["implementation"] in ("AdamW fused", READ_PASS)}
        if len(parts) == 2:
            floor_ms = parts["AdamW fused"]["median_ms"] + parts[READ_PASS]["median_ms"]
            rows.append({"workload": workload, "parameters": n, "implementation": FLOOR, "median_ms": floor_ms,
                         "min_ms": floor_ms, "state_bytes": parts["AdamW fused"]["state_bytes"],
                         "bandwidth_fraction": KOALA_PP_PASSES * n * dtype.itemsize / (floor_ms / 1e3) / bandwidth})

    for row in rows:
        baseline = next((r for r in rows if r["workload"] == row["workload"] and r["implementation"] == "AdamW foreach"), None)
        fused = next((r for r in rows if r["workload"] == row["workload"] and r["implementation"] == "AdamW fused"), None)
        row["vs_adamw_foreach"] = row["median_ms"] / baseline["median_ms"] if baseline else None
        row["vs_adamw_fused"] = row["median_ms"] / fused["median_ms"] if fused else None
    report = {
        "benchmark": "optimizer_step",
        "torch": torch.__version__,
        **provenance(__file__, argv, args.device, root=ROOT),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "cpu_kernel_build_s": build_s,
        "steps": args.steps,
        "dtype": args.dtype,
        "rows": rows,
    }
    suffix = "" if args.dtype == "float32" else "_bf16"
    write_report(args.output, f"optimizer_step_{args.device}{suffix}", report, markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [
        f"Optimizer step, {report['device']} (torch {report['torch']}), {report.get('dtype', 'float32')} parameters, "
        f"{report['date']}: `{report['command']}`",
        f"(median of {report['steps']} steps, implementations interleaved step by step; copy bandwidth "
        f"{report['copy_bandwidth_gb_s']:.1f} GB/s"
        + (f"; first-use build of the fused CPU kernels {report['cpu_kernel_build_s']:.1f} s)"
           if report.get("cpu_kernel_build_s") else ")"),
        "",
        "| shapes | implementation | median ms | x AdamW foreach | x AdamW fused | state MiB | of copy bandwidth | ops per step | CUDA: ATen ops + Triton launches | first step s | vs per-tensor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        ratio = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        share = f"{100 * r['bandwidth_fraction']:.0f}%" if r.get("bandwidth_fraction") else "-"
        ops = r.get("ops_per_step", "-")
        first = f"{r['first_step_s']:.2f}" if "first_step_s" in r else "-"
        cuda = f"{r['cuda_aten_ops']} + {r['cuda_triton_launches']}" if "cuda_aten_ops" in r else "-"
        lines.append(f"| {r['workload']} | {r['implementation']} | {r['median_ms']:.1f} | {ratio(r['vs_adamw_foreach'])} | "
                     f"{ratio(r['vs_adamw_fused'])} | {r['state_bytes'] / 2**20:.0f} | {share} | {ops} | {cuda} | {first} | "
                     + (f"{r['vs_per_tensor']:.0e} |" if "vs_per_tensor" in r else "- |"))
    lines += ["", "ops per step: on the CPU the ops `step()` calls directly (profiler), on CUDA the device kernels. "
              "CUDA: ATen ops + Triton launches: what one step dispatches on CUDA, counted on fake CUDA tensors "
              "(koala_hf.optim.profiling; views and device queries left out, a multi-tensor op counted as the kernels it "
              "launches: one on torch's fast route, one per tensor on its slow route); `fused` on CUDA is the Triton backend. "
              "vs per-tensor: the largest parameter difference from the variant's per-tensor path after the same "
              "steps, relative to the parameters' largest magnitude."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
