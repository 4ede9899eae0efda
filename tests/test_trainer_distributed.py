"""A 2-process CPU data-parallel KoalaTrainer run, launched with torchrun as accelerate launch would."""

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, run_two_processes


STEPS = 12


@pytest.mark.slow
def test_two_processes_take_the_steps_of_one_process_on_the_whole_batch(tmp_path):
    run_two_processes("ddp_koala_trainer.py", str(tmp_path / "ddp"), "8", str(STEPS))
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["world_size"] == 2 and "MULTI_CPU" in ranks[0]["distributed_type"]
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    # One process, batch 16 = 2 x 8, same data order: the same steps (float64; the token counts of the two
    # ranks' micro-batches differ, so this also checks the token-count normalisation across ranks).
    subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "ddp_koala_trainer.py"), str(tmp_path / "one"), "16",
                    str(STEPS)], check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    single = torch.load(tmp_path / "one" / "rank0.pt")
    assert single["world_size"] == 1
    error = ((ranks[0]["params"] - single["params"]).abs().max() / single["params"].abs().max()).item()
    assert error < 1e-10, error
    # The per-token losses matched the model's loss (which the Trainer scales by the process count), so KOALA
    # measured them rather than falling back to loss**2.
    assert ranks[0]["measured_per_sample"] and ranks[1]["measured_per_sample"]
    losses = ranks[0]["losses"]
    assert losses[-1] < losses[0], losses
