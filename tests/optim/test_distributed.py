"""Data parallelism: two gloo processes take identical steps, equal to one process on the whole batch."""

import pytest
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from koala_hf import OPTIMIZERS, create_optimizer
from tests.helpers import exit_distributed_process, flat_parameters, per_sample_losses, regression_batches, tiny_network

STEPS = 5
WORLD = 2
# (name, per-sample losses, noise mode): E1b's variance must be taken over the whole batch of every rank.
RUNS = [(name, True, "second_moment") for name in OPTIMIZERS] + [("koala++", False, "second_moment")]
RUNS += [(name, True, "variance") for name in OPTIMIZERS] + [("koala++", True, "none")]


def train(model, name, per_sample, noise, shard):
    """Train a fresh optimizer on ``shard(x), shard(y)`` of every batch; return the final parameters."""
    optimizer = create_optimizer(name, model.parameters(), lr=0.3, weight_decay=1e-3, noise=noise)
    for x, y in regression_batches(STEPS, batch=16):
        optimizer.zero_grad()
        losses = per_sample_losses(model, shard(x), shard(y))
        losses.mean().backward()
        optimizer.observe(losses.mean(), losses if per_sample else None)
        optimizer.step()
    return flat_parameters(getattr(model, "module", model))


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, per_sample, noise in RUNS:
            model = DistributedDataParallel(tiny_network())
            results[(name, per_sample, noise)] = train(model, name, per_sample, noise, lambda t: t.chunk(WORLD)[rank])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        exit_distributed_process()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_each_other_and_one_process_on_the_whole_batch():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    for run in RUNS:
        assert torch.equal(ranks[0][run], ranks[1][run]), run
        single = train(tiny_network(), *run, shard=lambda t: t)
        assert not torch.equal(single, flat_parameters(tiny_network()))
        torch.testing.assert_close(ranks[0][run], single, rtol=1e-12, atol=1e-14, msg=str(run))
