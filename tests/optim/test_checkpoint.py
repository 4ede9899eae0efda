"""koala_hf.optim.checkpoint: the loaded groups win, a loaded optimizer's state_dict() equals the uninterrupted
one's, and torch's generic state-dict contract (test_state_dict_deterministic, round trips) holds."""

import copy

import pytest
import torch

from koala_hf import OPTIMIZERS, create_optimizer
from koala_hf.optim.checkpoint import saved_variant
from tests.helpers import flat_parameters, regression_batches, tiny_network, train_step

PATHS = {"per-tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True},
         "triton": {"fused": "triton"}}
# Every hyperparameter away from its default (the filter-wide ones included).
NON_DEFAULT = {
    "koala++": dict(lr=0.3, sigma=0.2, q=0.05, alpha_r=0.8, noise="variance", weight_decay=1e-3),
    "koala++ns": dict(lr=0.3, sigma=0.2, q=0.05, r=0.5, noise="none", weight_decay=1e-3, symmetric=False),
    "koala-v": dict(lr=0.05, sigma=0.2, q=0.5, alpha_r=0.8, noise="variance", weight_decay=1e-3),
    "koala-m": dict(lr=0.3, sw=0.2, sc=0.05, sv=0.05, a=0.5, qw=0.02, qv=0.005, alpha_r=0.8, noise="variance",
                    weight_decay=1e-3),
}
CASES = [(name, path) for name in NON_DEFAULT for path in PATHS]
IDS = [f"{name}-{path}" for name, path in CASES]


def assert_same_state_dict(actual, expected, where="state_dict"):
    """Key for key; tensors equal in dtype, shape and value."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (where, set(actual) ^ set(expected))
        for key in expected:
            assert_same_state_dict(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same_state_dict(a, e, f"{where}[{index}]")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), where
    else:
        assert actual == expected, where


@pytest.mark.parametrize("name, path", CASES, ids=IDS)
def test_a_state_with_non_default_hyperparameters_continues_bit_identically_in_a_default_built_optimizer(name, path):
    batches = regression_batches(8)
    model = tiny_network()
    optimizer = create_optimizer(name, model.parameters(), **NON_DEFAULT[name], **PATHS[path])
    for x, y in batches[:4]:
        train_step(model, optimizer, x, y)
    twin = copy.deepcopy(model)
    default_built = OPTIMIZERS[name].cls(twin.parameters(), **PATHS[path])
    default_built.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for key, value in NON_DEFAULT[name].items():
        assert default_built.param_groups[0][key] == value, key
    for x, y in batches[4:]:
        train_step(model, optimizer, x, y)
        train_step(twin, default_built, x, y)
        assert torch.equal(flat_parameters(twin), flat_parameters(model))
    assert_same_state_dict(default_built.state_dict(), optimizer.state_dict())


@pytest.mark.parametrize("name, path", CASES, ids=IDS)
def test_the_state_dict_is_deterministic(name, path):
    """torch's test_state_dict_deterministic: prime, load into a twin over cloned parameters, step both with a
    closure; the weights stay equal at every step and so do the state dicts, key for key."""
    model = tiny_network()
    optimizer = create_optimizer(name, model.parameters(), **NON_DEFAULT[name], **PATHS[path])
    batches = regression_batches(20)

    def closure_for(net, opt, x, y):
        def closure():
            opt.zero_grad()
            loss = ((net(x) - y) ** 2).mean()
            loss.backward()
            return loss
        return closure

    for x, y in batches[:10]:
        optimizer.step(closure_for(model, optimizer, x, y))
    twin = copy.deepcopy(model)
    twin_optimizer = create_optimizer(name, twin.parameters(), **NON_DEFAULT[name], **PATHS[path])
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for x, y in batches[10:]:
        optimizer.step(closure_for(model, optimizer, x, y))
        twin_optimizer.step(closure_for(twin, twin_optimizer, x, y))
        assert torch.equal(flat_parameters(twin), flat_parameters(model))
    assert_same_state_dict(twin_optimizer.state_dict(), optimizer.state_dict())
    assert set(twin_optimizer.param_groups[0]) == set(optimizer.param_groups[0])  # no key a fresh one lacks


@pytest.mark.parametrize("name, path", CASES, ids=IDS)
def test_a_state_dict_round_trip_changes_nothing(name, path):
    model = tiny_network()
    optimizer = create_optimizer(name, model.parameters(), **NON_DEFAULT[name], **PATHS[path])
    groups_before = [set(group) for group in optimizer.param_groups]
    for x, y in regression_batches(3):
        train_step(model, optimizer, x, y)
    saved = copy.deepcopy(optimizer.state_dict())
    optimizer.load_state_dict(saved)
    assert_same_state_dict(optimizer.state_dict(), saved)
    assert [set(group) for group in optimizer.param_groups] == groups_before
    assert "koala" in optimizer.state and "koala" not in optimizer.param_groups[0]


def test_a_state_dict_before_any_step_is_recognised_by_its_groups_alone():
    for name, entry in OPTIMIZERS.items():
        state_dict = create_optimizer(name, tiny_network().parameters()).state_dict()
        assert saved_variant(state_dict) == entry.cls.__name__, name
    adamw = torch.optim.AdamW(tiny_network().parameters()).state_dict()
    assert saved_variant(adamw).startswith("another optimizer (hyperparameters ")
