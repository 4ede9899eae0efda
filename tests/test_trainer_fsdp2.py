"""KoalaTrainer through accelerate's FSDP2 on two CPU processes (torchrun, gloo): an interrupted run resumed
from its checkpoint ends identical to the uninterrupted one, with sharded and with full state dicts."""

import pytest
import torch

from tests.helpers import run_two_processes

fsdp = pytest.importorskip("torch.distributed.fsdp")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(fsdp, "fully_shard"), reason="FSDP2 (fully_shard) needs torch >= 2.6")
@pytest.mark.parametrize("state_dict_type", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_a_resumed_fsdp2_run_ends_identical_to_the_uninterrupted_one(tmp_path, state_dict_type):
    run_two_processes("fsdp2_koala_trainer.py", str(tmp_path), state_dict_type)  # 12 steps, checkpoints at 6 and 12
    run_two_processes("fsdp2_koala_trainer.py", str(tmp_path), state_dict_type, str(tmp_path / "checkpoint-6"))
    whole = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    resumed = [torch.load(tmp_path / f"rank{r}-resumed.pt") for r in range(2)]
    assert whole[0]["sharded"] == "DTensor" and "FSDP" in whole[0]["distributed_type"]
    assert whole[0]["losses"][-1] < whole[0]["losses"][0]
    for run in whole + resumed:
        assert run["measured_per_sample"]  # the per-token measurement, not the loss**2 fallback
        assert run["koala_steps"] == 12  # the resumed optimizer continued the saved state's 6 steps
        assert torch.equal(run["params"], whole[0]["params"])
