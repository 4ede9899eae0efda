"""Which implementation path KOALA runs by default where users train: ``KoalaTrainer`` with nothing set.

    python benchmarks/default_path.py                  # the GPU when there is one, else the CPU
    python benchmarks/default_path.py --device cuda

Trains a small GPT-2 (random weights) for a few steps through ``KoalaTrainer`` with its defaults, with every
variant, and records the backend each step's parameter groups ran on (koala_hf.optim.dispatch.choose_backend):
on CUDA this must be the Triton kernels (``fused=None``, the default), with no fallback notice. Writes
``benchmarks/results/default_path_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch

from koala_hf.optim import dispatch
from koala_hf.recipe_support.results import provenance, write_report

ROOT = Path(__file__).resolve().parents[1]


def trained_backends(variant: str, device: str, steps: int) -> tuple[Counter, list[str]]:
    """The backends the steps of a default ``KoalaTrainer`` run chose, and the warnings it gave."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    from koala_hf import KoalaTrainer, KoalaTrainingArguments

    chosen: Counter = Counter()
    real = dispatch.choose_backend

    def recording(group, tensors, optimizer):
        backend = real(group, tensors, optimizer)
        chosen[backend.value] += 1
        return backend

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128))
    sequences = [[(start + i) % 128 for i in range(32)] for start in range(64)]
    data = Dataset.from_dict({"input_ids": sequences, "labels": sequences})
    with tempfile.TemporaryDirectory() as output, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = KoalaTrainingArguments(output_dir=output, max_steps=steps, per_device_train_batch_size=16, report_to="none",
                                      koala_optimizer=variant, use_cpu=device == "cpu", save_strategy="no")
        dispatch.choose_backend = recording
        try:
            KoalaTrainer(model=model, args=args, train_dataset=data).train()
        finally:
            dispatch.choose_backend = real
    notices = [str(w.message) for w in caught if "Triton" in str(w.message) or "foreach path" in str(w.message)]
    return chosen, notices


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    rows = []
    for variant in ("koala++", "koala-v", "koala-m"):
        chosen, notices = trained_backends(variant, args.device, args.steps)
        rows.append({"variant": variant, "backends": dict(chosen), "notices": notices})
        print(variant, dict(chosen), notices)
    report = {"benchmark": "default_path", "torch": torch.__version__, **provenance(__file__, argv, args.device, root=ROOT),
              "rows": rows}
    lines = [f"Default path through KoalaTrainer, {report['device']} (torch {report['torch']}), {report['date']}: "
             f"`{report['command']}`", "", "| variant | backend of each group step | fallback notices |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {', '.join(f'{k} x{v}' for k, v in r['backends'].items())} | "
              f"{'; '.join(r['notices']) or 'none'} |" for r in rows]
    write_report(args.output, f"default_path_{args.device}", report, "\n".join(lines) + "\n")
    if args.device == "cuda" and any(set(r["backends"]) != {"triton"} or r["notices"] for r in rows):
        raise SystemExit("on CUDA the default path must be the Triton kernels, without a fallback")
    return report


if __name__ == "__main__":
    main()
