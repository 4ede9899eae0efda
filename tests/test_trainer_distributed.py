"""A 2-process CPU data-parallel KoalaTrainer run, launched with torchrun as accelerate launch would."""

import pytest
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_end_identical_with_a_falling_loss(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(ROOT / "tests" / "scripts" / "ddp_koala_trainer.py"), str(tmp_path),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["world_size"] == 2 and "MULTI_CPU" in ranks[0]["distributed_type"]
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    # The per-token losses matched the model's loss (which the Trainer scales by the process count), so KOALA
    # measured them rather than falling back to loss**2.
    assert ranks[0]["measured_per_sample"] and ranks[1]["measured_per_sample"]
    losses = ranks[0]["losses"]
    assert losses[-1] < 0.9 * losses[0], losses
