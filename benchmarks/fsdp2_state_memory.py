"""Per-process KOALA++ memory under FSDP2: one process against two sharded processes (gloo, CPU).

    python benchmarks/fsdp2_state_memory.py

The model is the papers' WikiText-2 GPT (``OpenAIGPTLMHeadModel``, 4 x 768, 12 heads, context 256, GPT-1's
40,479-token vocabulary) with frozen embeddings, so the optimizer holds the 4 blocks (28.35M parameters, as the
official logs record). One process trains the whole model; two processes shard every block and the root with
``fully_shard``. After one KOALA++ step (random tokens), each process reports the bytes it holds of trained
parameters, gradients and optimizer state (``v``, ``H_prev`` and the per-layer scalars), counting local shards.

Writes ``benchmarks/results/fsdp2_state_memory_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from koala_hf import KOALAPlusPlus
from koala_hf.optim.sharding import local
from koala_hf.recipe_support.results import provenance, write_report

ROOT = Path(__file__).resolve().parents[1]

MIB = 2**20


def paper_model():
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    torch.manual_seed(0)
    config = OpenAIGPTConfig(vocab_size=40479, n_positions=256, n_embd=768, n_layer=4, n_head=12)
    model = OpenAIGPTLMHeadModel(config)
    for module in (model.transformer.tokens_embed, model.transformer.positions_embed):
        module.weight.requires_grad_(False)
    return model


def measure(model, world: int, rank: int) -> dict:
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = KOALAPlusPlus(trained, lr=2e-3, noise="none", weight_decay=1e-4)
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 40479, (2, 64), generator=generator)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.observe(loss.detach())
    optimizer.step()

    def size(tensors):
        return sum(local(t).numel() * local(t).element_size() for t in tensors)

    state = [t for p in trained for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)]
    return {
        "processes": world,
        "rank": rank,
        "trained_parameters": sum(p.numel() for p in trained),
        "parameters_MiB": size(trained) / MIB,
        "gradients_MiB": size([p.grad for p in trained]) / MIB,
        "optimizer_state_MiB": size(state) / MIB,
    }


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from torch.distributed.fsdp import fully_shard

        model = paper_model()
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        torch.save(measure(model, 2, rank), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    rows = [measure(paper_model(), 1, 0)]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        rows += [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    report = {**provenance(__file__, argv, "cpu", root=ROOT), "rows": rows}
    write_report(args.output, "fsdp2_state_memory_cpu", report, markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [
        f"KOALA++ memory per process under FSDP2, {report['device']}, {report['date']}: `{report['command']}`",
        "",
        "| processes | rank | trained parameters (whole model) | parameters MiB | gradients MiB | optimizer state MiB |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['processes']} | {row['rank']} | {row['trained_parameters']:,} | {row['parameters_MiB']:.1f} "
            f"| {row['gradients_MiB']:.1f} | {row['optimizer_state_MiB']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
