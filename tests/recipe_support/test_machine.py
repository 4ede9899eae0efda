"""koala_hf.recipe_support.machine: the CPU threads a launched recipe gets, and how it was launched."""

import os

from koala_hf.recipe_support import machine


def test_accelerate_launch_on_cpu_gets_the_machines_cores(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(machine, "accelerator_available", lambda: False)
    before = machine.torch.get_num_threads()
    try:
        machine.torch.set_num_threads(1)
        assert machine.use_the_machines_cores() == max(1, os.cpu_count())
        assert machine.launcher() == "accelerate launch"
    finally:
        machine.torch.set_num_threads(before)
