"""A 2-process CPU data-parallel KoalaTrainer run, launched with torchrun as accelerate launch would."""

import pytest
import torch

from tests.helpers import run_two_processes


@pytest.mark.slow
def test_two_processes_end_identical_with_a_falling_loss(tmp_path):
    run_two_processes("ddp_koala_trainer.py", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["world_size"] == 2 and "MULTI_CPU" in ranks[0]["distributed_type"]
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    # The per-token losses matched the model's loss (which the Trainer scales by the process count), so KOALA
    # measured them rather than falling back to loss**2.
    assert ranks[0]["measured_per_sample"] and ranks[1]["measured_per_sample"]
    losses = ranks[0]["losses"]
    assert losses[-1] < 0.9 * losses[0], losses
