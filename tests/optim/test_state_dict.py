"""A mid-run state_dict round trip continues bit-identically (per-parameter and filter-wide state)."""

import copy
import io

import pytest
import torch

from koala_hf import OPTIMIZERS, create_optimizer
from koala_hf.optim.checkpoint import saved_filter_state
from tests.helpers import flat_parameters, regression_batches, tiny_network, train_step

SETTINGS = {"koala++": {"lr": 0.5}, "koala++ns": {"lr": 0.5}, "koala-v": {"lr": 0.1}, "koala-m": {"lr": 0.5}}


def run(model, optimizer, batches, dtype):
    for x, y in batches:
        train_step(model, optimizer, x.to(dtype), y.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resumed_run_equals_uninterrupted_run(name, foreach, dtype):
    batches = regression_batches(12, dtype=torch.float32)
    model = tiny_network(dtype)
    optimizer = create_optimizer(name, model.parameters(), foreach=foreach, weight_decay=1e-3, **SETTINGS[name])
    run(model, optimizer, batches[:6], dtype)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    run(model, optimizer, batches[6:], dtype)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model = tiny_network(dtype, seed=123)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = create_optimizer(name, resumed_model.parameters(), foreach=foreach, weight_decay=1e-3, **SETTINGS[name])
    resumed.load_state_dict(checkpoint["optimizer"])
    run(resumed_model, resumed, batches[6:], dtype)

    assert torch.equal(flat_parameters(resumed_model), flat_parameters(model))
    for key, value in optimizer.state["koala"].items():
        assert torch.equal(torch.as_tensor(resumed.state["koala"][key]), torch.as_tensor(value)), key


def test_scalar_state_keeps_its_precision_and_is_not_shared_with_the_checkpoint():
    model = tiny_network(torch.bfloat16)
    optimizer = create_optimizer("koala++", model.parameters())
    run(model, optimizer, regression_batches(2, dtype=torch.float32), torch.bfloat16)
    saved = copy.deepcopy(optimizer.state_dict())
    optimizer.load_state_dict(saved)
    first = next(iter(model.parameters()))
    assert optimizer.state[first]["filter"].dtype == torch.float32
    assert optimizer.state[first]["v"].dtype == torch.bfloat16
    assert torch.equal(optimizer.state[first]["filter"], saved["state"][0]["filter"])
    optimizer.state["koala"]["R"].add_(1)
    assert not torch.equal(optimizer.state["koala"]["R"], saved_filter_state(saved["state"], saved["param_groups"])["R"])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_loaded_state_moves_to_the_parameters_device(name):
    """A checkpoint saved on one device loads onto another (``meta`` stands in for a GPU here)."""
    model = tiny_network(torch.float32)
    optimizer = create_optimizer(name, model.parameters())
    run(model, optimizer, regression_batches(2, dtype=torch.float32), torch.float32)
    on_meta = tiny_network(torch.float32).to("meta")
    moved = create_optimizer(name, on_meta.parameters())
    moved.load_state_dict(optimizer.state_dict())
    for key, value in moved.state.items():
        for tensor in value.values():
            if isinstance(tensor, torch.Tensor):
                assert tensor.device.type == "meta", (key, tensor)


def test_koala_ms_mode_is_kept_in_one_place_before_and_after_its_state_exists():
    """Before the first step (predicted and posterior weights are the same) the mode is the optimizer's own; the
    first step moves it into the filter-wide state, which saves and loads it; a pickled optimizer keeps it."""
    import pickle

    model = tiny_network(torch.float32)
    optimizer = create_optimizer("koala-m", model.parameters())
    optimizer.eval()
    assert optimizer.training is False and pickle.loads(pickle.dumps(optimizer)).training is False
    optimizer.train()
    run(model, optimizer, regression_batches(2, dtype=torch.float32), torch.float32)
    assert "_mode_before_state" not in optimizer.__dict__ and optimizer.state["koala"]["training"] is True
    optimizer.eval()
    assert optimizer.training is False and optimizer.state["koala"]["training"] is False
    saved = optimizer.state_dict()
    fresh = create_optimizer("koala-m", tiny_network(torch.float32).parameters())
    fresh.load_state_dict(saved)
    assert fresh.training is False
