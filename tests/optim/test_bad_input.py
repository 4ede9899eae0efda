"""Bad input gets its documented behaviour: clear errors, or skips that change nothing."""

import copy

import pytest
import torch
from torch import nn

from koala_hf import KOALAM, KOALAV, OPTIMIZERS, KOALAPlusPlus, create_optimizer
from koala_hf.optim.checkpoint import saved_filter_state
from tests.helpers import flat_parameters, per_sample_losses, regression_batches, tiny_network, train_step

INVALID = [
    (KOALAPlusPlus, "lr", -1.0),
    (KOALAPlusPlus, "lr", float("nan")),
    (KOALAPlusPlus, "sigma", 0.0),
    (KOALAPlusPlus, "sigma", -0.1),
    (KOALAPlusPlus, "q", -0.1),
    (KOALAPlusPlus, "r", 0.0),
    (KOALAPlusPlus, "r", -1.0),
    (KOALAPlusPlus, "alpha_r", 1.0),
    (KOALAPlusPlus, "alpha_r", -0.1),
    (KOALAPlusPlus, "weight_decay", -1e-4),
    (KOALAV, "lr", -0.1),
    (KOALAV, "sigma", 0.0),
    (KOALAV, "q", -1.0),
    (KOALAV, "r", 0.0),
    (KOALAV, "alpha_r", 1.5),
    (KOALAM, "lr", -1.0),
    (KOALAM, "a", 0.0),
    (KOALAM, "a", 1.0),
    (KOALAM, "sw", 0.0),
    (KOALAM, "sv", -0.1),
    (KOALAM, "sc", 0.5),  # sc^2 > sw * sv: P not positive semi-definite
    (KOALAM, "qw", -0.01),
    (KOALAM, "qv", -0.01),
    (KOALAM, "r", -1.0),
    (KOALAM, "alpha_r", 1.0),
]


@pytest.mark.parametrize("cls, name, value", INVALID, ids=[f"{c.__name__}-{n}={v}" for c, n, v in INVALID])
def test_invalid_hyperparameters_name_the_argument_and_its_range(cls, name, value):
    with pytest.raises(ValueError, match=rf"Invalid {name}: .*(must|P = )"):
        cls(tiny_network().parameters(), **{name: value})


def test_invalid_hyperparameters_in_a_later_group_are_refused():
    model = tiny_network()
    optimizer = KOALAPlusPlus(list(model.parameters())[:2])
    with pytest.raises(ValueError, match="Invalid sigma"):
        optimizer.add_param_group({"params": list(model.parameters())[2:], "sigma": -1.0})


@pytest.mark.parametrize("cls, name", [(KOALAV, "q"), (KOALAM, "a")])
def test_filter_wide_hyperparameters_must_agree_across_groups(cls, name):
    params = list(tiny_network().parameters())
    with pytest.raises(ValueError, match=f"{name} belongs to the whole filter"):
        cls([{"params": params[:2]}, {"params": params[2:], name: 0.5}])


def test_sparse_gradients_are_refused():
    embedding = nn.Embedding(10, 4, sparse=True)
    optimizer = KOALAPlusPlus(embedding.parameters())
    loss = embedding(torch.tensor([1, 2])).sum()
    loss.backward()
    optimizer.observe(loss)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()


def test_complex_parameters_are_refused():
    with pytest.raises(ValueError, match="complex parameters"):
        KOALAPlusPlus([nn.Parameter(torch.zeros(3, dtype=torch.complex64))])


def snapshot(model, optimizer):
    return flat_parameters(model).clone(), copy.deepcopy(optimizer.state_dict())


def assert_same_state(before, after):
    assert torch.equal(before[0], after[0])
    state_before, state_after = before[1]["state"], after[1]["state"]
    assert state_before.keys() == state_after.keys()
    for key in state_before:
        entries = [(name, value, state_after[key][name]) for name, value in state_before[key].items() if name != "koala"]
        filter_before = state_before[key].get("koala", {})  # the filter-wide state, in the first parameter's
        entries += [(name, value, state_after[key]["koala"][name]) for name, value in filter_before.items()]
        for name, value, after_value in entries:
            if name == "skipped_steps":
                continue
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, after_value), (key, name)
            else:
                assert value == after_value, (key, name)


def poison_loss(model, optimizer, x, y):
    losses = per_sample_losses(model, x, y)
    losses.mean().backward()
    optimizer.observe(torch.tensor(float("nan"), dtype=losses.dtype), losses)


def poison_gradient(model, optimizer, x, y):
    losses = per_sample_losses(model, x, y)
    losses.mean().backward()
    list(model.parameters())[-1].grad[0] = float("inf")
    optimizer.observe(losses.mean(), losses)


PATHS = [(name, {"foreach": foreach}) for name in OPTIMIZERS for foreach in (False, True)]
PATHS += [(name, {"fused": True}) for name in ("koala++", "koala-v", "koala-m")]


@pytest.mark.parametrize("poison", [poison_loss, poison_gradient], ids=["nan-loss", "inf-gradient"])
@pytest.mark.parametrize("name, path", PATHS, ids=[f"{n}-{next(iter(p))}={next(iter(p.values()))}" for n, p in PATHS])
def test_a_non_finite_step_changes_nothing_but_the_skip_counter(name, path, poison):
    model = tiny_network()
    optimizer = create_optimizer(name, model.parameters(), weight_decay=1e-3, lr=0.1, **path)
    batches = regression_batches(5)
    for x, y in batches[:3]:
        train_step(model, optimizer, x, y)
    before = snapshot(model, optimizer)

    optimizer.zero_grad()
    poison(model, optimizer, *batches[3])
    optimizer.step()

    assert_same_state(before, snapshot(model, optimizer))
    assert optimizer.state["koala"]["skipped_steps"].item() == 1
    saved = optimizer.state_dict()
    assert saved_filter_state(saved["state"], saved["param_groups"])["skipped_steps"].item() == 1
    train_step(model, optimizer, *batches[4])  # training goes on
    assert torch.isfinite(flat_parameters(model)).all()
    assert not torch.equal(flat_parameters(model), before[0])


def test_a_non_finite_first_step_creates_state_but_moves_nothing():
    model = tiny_network()
    optimizer = KOALAPlusPlus(model.parameters())
    before = flat_parameters(model).clone()
    poison_gradient(model, optimizer, *regression_batches(1)[0])
    optimizer.step()
    assert torch.equal(flat_parameters(model), before)
    assert optimizer.state["koala"]["skipped_steps"].item() == 1
    first = next(iter(model.parameters()))
    assert optimizer.state[first]["filter"][3].item() == 0  # still waiting for its first (E10) step


@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
def test_a_layer_with_non_positive_innovation_variance_is_frozen_then_restarts_from_e10(foreach):
    model = tiny_network()
    optimizer = KOALAPlusPlus(model.parameters(), lr=0.5, foreach=foreach)
    batches = regression_batches(4)
    for x, y in batches[:2]:
        train_step(model, optimizer, x, y)
    layers = list(model.parameters())
    unstable = layers[0]
    # A tiny positive S_prev makes lambda huge, so E15 gives S < 0 for this layer.
    optimizer.state[unstable]["filter"][0] = 1e-30
    frozen = unstable.detach().clone()
    others = [p.detach().clone() for p in layers[1:]]

    train_step(model, optimizer, *batches[2])
    assert torch.equal(unstable.detach(), frozen)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(layers[1:], others))
    state = optimizer.state[unstable]
    assert state["filter"].count_nonzero() == 0 and state["v"].count_nonzero() == 0
    assert state["H_prev"].count_nonzero() == 0
    assert optimizer.state["koala"]["skipped_steps"].item() == 0

    # Its next step is a first step (E10): the closed form with this step's R.
    x, y = batches[3]
    optimizer.zero_grad()
    losses = per_sample_losses(model, x, y)
    losses.mean().backward()
    H = unstable.grad.detach().clone()
    R_before = optimizer.state["koala"]["R"][0].item()
    optimizer.observe(losses.mean(), losses)
    optimizer.step()
    R = 0.9 * R_before + 0.1 * (losses.detach() ** 2).mean()
    L = losses.detach().mean()
    c, q = 0.2, 0.1
    hh = (H * H).sum()
    lam = c * hh / (c * hh + R)
    S = ((1 - lam) * c + q) * hh + R
    expected = frozen - 0.5 * L * ((1 - lam) * c + q) / S * H
    torch.testing.assert_close(unstable.detach(), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_layer_with_a_vanishing_gradient_is_not_updated(name):
    model = tiny_network()
    optimizer = create_optimizer(name, model.parameters(), lr=0.1)
    last_bias = list(model.parameters())[-1]
    x, y = regression_batches(1)[0]
    losses = per_sample_losses(model, x, y)
    losses.mean().backward()
    last_bias.grad.zero_()
    optimizer.observe(losses.mean(), losses)
    before = last_bias.detach().clone()
    optimizer.step()
    assert torch.equal(last_bias.detach(), before)
    assert torch.isfinite(flat_parameters(model)).all()

