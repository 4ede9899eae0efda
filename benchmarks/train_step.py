"""End-to-end training-step time of the recipes' models: KOALA++ against AdamW.

    python benchmarks/train_step.py                       # CPU: small batches
    python benchmarks/train_step.py --lm_batch 32 --vision_batch 128 --bf16   # a GPU, the papers' batches

A step is what KoalaTrainer does per optimizer step: forward, the per-sample
losses KOALA measures (E1), backward, observe, step, zero_grad (AdamW skips the
KOALA-only parts). Models: the WikiText-2 recipe's ``paper`` GPT (54M, context
256) and the vision recipe's ResNet-50 (CIFAR stem, 100 classes), random data.
Optimizers: AdamW foreach and fused, and KOALA++ on its default path (the Triton kernels on CUDA;
``--koala_fused``: its fused backend on any device, C++ on the CPU). ``--bf16``: the forward under bfloat16
autocast. ``--tiny``: both models at a tiny size (a check of the script, as benchmarks/gpu_check.sh --tiny runs it).
Writes ``benchmarks/results/train_step_<device>.json`` and ``.md`` (``train_step_<device>_bf16`` with
``--bf16``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from koala_hf import KOALAPlusPlus, per_sample_losses
from koala_hf.recipe_support.results import provenance, write_report

ROOT = Path(__file__).resolve().parents[1]


# The recipe's ``paper`` GPT, and (``--tiny``) the same architecture at a size whose bf16 step takes well under a
# second on a CPU without bf16 matrix units, where the full one takes about 40 s: a check of the script, not a timing.
LM_SIZES = {"paper": dict(vocab_size=33278, n_positions=256, n_embd=768, n_layer=4, n_head=12),
            "tiny": dict(vocab_size=1024, n_positions=32, n_embd=64, n_layer=1, n_head=2)}
VISION_MODELS = {"paper": "resnet50_cifar", "tiny": "resnet18_cifar"}


def lm_workload(batch: int, device: str, size: str = "paper"):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**LM_SIZES[size], bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).to(device)
    ids = torch.randint(0, config.vocab_size, (batch, config.n_positions), device=device)
    return model, {"input_ids": ids, "labels": ids}, True


def vision_workload(batch: int, device: str, size: str = "paper"):
    from koala_hf.vision import ImageClassifier, create_model

    model = ImageClassifier(create_model(VISION_MODELS[size], num_classes=100)).to(device)
    inputs = {"pixel_values": torch.randn(batch, 3, 32, 32, device=device), "labels": torch.randint(0, 100, (batch,), device=device)}
    return model, inputs, False


def time_training(model, inputs, shift: bool, optimizer, device: str, steps: int, warmup: int, bf16: bool) -> float:
    koala = hasattr(optimizer, "observe")
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else nullcontext()
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            outputs = model(**inputs)
        loss = outputs["loss"]
        loss.backward()
        if koala:
            optimizer.observe(loss, per_sample_losses(outputs, inputs["labels"], shift_labels=shift))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--lm_batch", type=int, default=32 if cuda else 2)
    parser.add_argument("--vision_batch", type=int, default=128 if cuda else 16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--koala_fused", action="store_true", help="KOALA++ with fused=True (C++ on the CPU, Triton on CUDA)")
    parser.add_argument("--tiny", action="store_true", help="the same models at a tiny size: a check of the script (CI), not a timing")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    size = "tiny" if args.tiny else "paper"
    rows = []
    workloads = (("LM tiny GPT" if args.tiny else "LM paper GPT", lm_workload, args.lm_batch),
                 ("ResNet-18 CIFAR" if args.tiny else "ResNet-50 CIFAR", vision_workload, args.vision_batch))
    for name, build, batch in workloads:
        for optimizer_name in ("AdamW", "AdamW fused", "KOALA++"):
            torch.manual_seed(0)
            model, inputs, shift = build(batch, args.device, size)
            if optimizer_name.startswith("AdamW"):
                kind = {"fused": True} if optimizer_name == "AdamW fused" else {"foreach": True}
                optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=5e-4, **kind)
            else:
                optimizer = KOALAPlusPlus(model.parameters(), lr=2e-3, weight_decay=1e-4, fused=True if args.koala_fused else None)
            ms = time_training(model, inputs, shift, optimizer, args.device, args.steps, args.warmup, args.bf16)
            rows.append({"workload": name, "batch": batch, "optimizer": optimizer_name, "median_ms": ms})
            print(f"{name:16s} batch {batch:4d} {optimizer_name:8s} {ms:9.1f} ms")
            del model, optimizer
    for row in rows:
        for key, baseline in (("vs_adamw", "AdamW"), ("vs_adamw_fused", "AdamW fused")):
            reference = next(r for r in rows if r["workload"] == row["workload"] and r["optimizer"] == baseline)
            row[key] = row["median_ms"] / reference["median_ms"]
    report = {
        "benchmark": "train_step",
        "torch": torch.__version__,
        **provenance(__file__, argv, args.device, root=ROOT),
        "bf16": args.bf16,
        "koala_fused": args.koala_fused,
        "rows": rows,
    }
    lines = [f"Training step, {report['device']} (torch {report['torch']}), {'bf16 autocast' if args.bf16 else 'fp32'}, "
             f"{report['date']}: `{report['command']}`", "",
             "| model | batch | optimizer | median ms | x AdamW (foreach) | x AdamW fused |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['workload']} | {r['batch']} | {r['optimizer']} | {r['median_ms']:.1f} | {r['vs_adamw']:.3f} | "
              f"{r['vs_adamw_fused']:.3f} |" for r in rows]
    write_report(args.output, f"train_step_{args.device}{'_bf16' if args.bf16 else ''}", report, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
