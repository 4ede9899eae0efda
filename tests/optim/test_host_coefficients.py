"""koala_hf.optim.host_coefficients: the foreach update off the CPU reads its coefficients to the host once per
step and applies them as scalar lists (its float64 trajectories: tests/optim/test_pinned_trajectories.py)."""

import dataclasses

import pytest
import torch

from koala_hf import OPTIMIZERS, create_optimizer
from koala_hf.optim import host_coefficients, layers, layouts
from tests.helpers import (flat_parameters, observe_batch, per_sample_losses, regression_batches, tiny_network,
                           weight_and_bias_groups)


def test_read_gives_each_groups_table_row_by_row_and_the_steps_ok_in_one_copy():
    first = torch.arange(8, dtype=torch.float32).reshape(2, 4) / 8
    second = torch.arange(4, dtype=torch.float64).reshape(1, 4) + 10
    host = host_coefficients.read([first, second], torch.tensor(True))
    assert host.ok is True
    assert host.groups == [[0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875], [10.0, 11.0, 12.0, 13.0]]
    assert host_coefficients.read([torch.ones(3, 1)], torch.tensor(False)).ok is False


def test_columns_follow_the_layout_and_pick_a_buckets_layers():
    numbers = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875]  # two layers' rows of KOALA-M's four columns
    assert host_coefficients.columns(layouts.KOALA_M, numbers, [0, 1]) == {
        "step_theta": [0.0, 0.5], "step_u": [0.125, 0.625], "keep_avg": [0.25, 0.75], "take_theta": [0.375, 0.875]}
    assert host_coefficients.columns(layouts.KOALA_M, numbers, [1])["keep_avg"] == [0.75]
    reordered = dataclasses.replace(layouts.KOALA_M, coefficients=layouts.KOALA_M.coefficients[::-1])
    assert host_coefficients.columns(reordered, numbers, [0, 1])["take_theta"] == [0.0, 0.5]


def test_a_float32_coefficient_reaches_the_host_exactly():
    value = torch.tensor([[1 / 3]], dtype=torch.float32)
    (number,), = host_coefficients.read([value], torch.tensor(True)).groups
    assert torch.tensor(number, dtype=torch.float32) == value[0, 0] and number == value.double().item()


@pytest.fixture
def as_on_a_device(monkeypatch):
    """The foreach path of a device, on the CPU: coefficients read to the host, multi-tensor sums, nothing read
    for free."""
    monkeypatch.setattr(host_coefficients, "DEVICE_COEFFICIENTS", ())
    monkeypatch.setattr(layers, "HOST_READABLE", ())
    monkeypatch.setattr(layers, "PER_LAYER_SUMS", ())


def counting_host_copies(monkeypatch) -> list:
    """Each ``Tensor.cpu()`` call, recorded; any other read of a value back (``item``, ``bool`` ...) refused."""
    copies = []
    real_cpu = torch.Tensor.cpu

    def cpu(self, *args, **kwargs):
        copies.append(self.shape)
        return real_cpu(self, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("step() read a tensor value back other than by its one copy to the host")

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    for method in ("item", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    return copies


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_off_the_cpu_each_step_copies_every_groups_coefficients_to_the_host_once(name, as_on_a_device, monkeypatch):
    model = tiny_network()
    groups = weight_and_bias_groups(model, {"lr": 0.1, "weight_decay": 1e-3}, {"lr": 0.05})
    optimizer = create_optimizer(name, groups, foreach=True)
    layers_stepped = sum(len(group["params"]) for group in optimizer.param_groups)
    width = len({"koala++": layouts.KOALA_PLUS_PLUS, "koala++ns": layouts.KOALA_PLUS_PLUS, "koala-v": layouts.KOALA_V,
                 "koala-m": layouts.KOALA_M}[name].coefficients)
    for x, y in regression_batches(3):
        observe_batch(model, optimizer, x, y)
        with monkeypatch.context() as patch:
            copies = counting_host_copies(patch)
            optimizer.step()
        assert copies == [torch.Size([layers_stepped * width + 1])]  # both groups' rows and ok, in one copy
    assert torch.isfinite(flat_parameters(model)).all()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_off_the_cpu_a_step_with_a_non_finite_gradient_changes_no_tensor(name, as_on_a_device):
    model = tiny_network()
    optimizer = create_optimizer(name, model.parameters(), foreach=True, lr=0.1, weight_decay=1e-3)
    (x, y), = regression_batches(1)
    for poisoned in (False, True):
        optimizer.zero_grad()
        losses = per_sample_losses(model, x, y)
        losses.mean().backward()
        if poisoned:
            next(model.parameters()).grad[0, 0] = float("inf")
            before = {id(t): t.clone() for p in model.parameters() for t in [p, *optimizer.state[p].values()]}
        optimizer.observe(losses.mean(), losses)
        optimizer.step()
    for p in model.parameters():
        for t in [p, *optimizer.state[p].values()]:
            assert torch.equal(t, before[id(t)])
    assert optimizer.state["koala"]["skipped_steps"].item() == 1


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_off_the_cpu_bfloat16_layers_step_as_the_per_tensor_path_steps_them(name, monkeypatch):
    """16-bit layers are updated on float32 copies and stored once per quantity, as on every path."""
    runs = {}
    for path in ("per-tensor", "foreach-host"):
        with monkeypatch.context() as patch:
            if path == "foreach-host":
                patch.setattr(host_coefficients, "DEVICE_COEFFICIENTS", ())
            model = tiny_network(torch.bfloat16)
            optimizer = create_optimizer(name, model.parameters(), foreach=path != "per-tensor", lr=0.1)
            (x, y), = regression_batches(1, batch=64, dtype=torch.bfloat16)
            for _ in range(5):
                optimizer.zero_grad()
                losses = per_sample_losses(model, x, y)
                losses.float().mean().backward()
                optimizer.observe(losses.float().mean(), losses.float())
                optimizer.step()
            runs[path] = flat_parameters(model).float()
    assert torch.equal(runs["foreach-host"], runs["per-tensor"])  # the same float32 arithmetic, the same roundings
