"""koala_hf.optim.gather_cache: a step reuses the last step's records while the groups' parameters and the
addresses of parameters and gradients are unchanged, rebuilds them on any other change, steps as a fresh
build does, and runs no Python per parameter when it reuses them."""

import weakref

import pytest
import torch
from torch import nn

from koala_hf import KOALAM, KOALAV, KOALAPlusPlus
from koala_hf.optim import group_step
from koala_hf.optim.gather_cache import take
from koala_hf.optim.profiling import python_calls, recording_launches

VARIANTS = [KOALAPlusPlus, KOALAV, KOALAM]
IDS = ["koala++", "koala-v", "koala-m"]


@pytest.fixture
def builds(monkeypatch):
    """The groups built anew (group_step._group_step calls), by group index."""
    built = []
    real = group_step._group_step

    def counted(optimizer, index, *args):
        built.append(index)
        return real(optimizer, index, *args)

    monkeypatch.setattr(group_step, "_group_step", counted)
    return built


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def train_step(optimizer, net, seed, set_to_none=True):
    optimizer.zero_grad(set_to_none=set_to_none)
    torch.manual_seed(seed)
    loss = net(torch.randn(5, 4)).square().mean()
    loss.backward()
    optimizer.observe(loss.detach())
    optimizer.step()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_training_loop_reuses_the_records_with_each_steps_gradients(builds, set_to_none):
    net = model()
    optimizer = KOALAPlusPlus(net.parameters(), lr=0.1, foreach=True)
    train_step(optimizer, net, 0)
    first = group_step.gather(optimizer)
    assert builds == [0]
    for k in range(1, 4):
        train_step(optimizer, net, k, set_to_none)  # set_to_none: new gradients, wherever they are allocated
        now = group_step.gather(optimizer)
        assert builds == [0]
        assert now[0].params is first[0].params and now[0].states is first[0].states
        assert all(g is p.grad for g, p in zip(now[0].grads, net.parameters()))
        assert now[0].grad_addresses == [p.grad.data_ptr() for p in net.parameters()]


def test_the_kept_records_hold_no_gradient_alive():
    net = model()
    optimizer = KOALAPlusPlus(net.parameters(), lr=0.1)
    train_step(optimizer, net, 0)
    gradient = weakref.ref(net[0].weight.grad)
    optimizer.zero_grad(set_to_none=True)
    assert gradient() is None


@pytest.mark.parametrize("change", ["grad set to None", "data replaced", "param swapped",
                                    "param appended", "group added", "option changed", "state loaded",
                                    "state emptied"])
def test_any_other_change_rebuilds_them(builds, change):
    net = model()
    params = list(net.parameters())
    optimizer = KOALAPlusPlus(params, lr=0.1)
    train_step(optimizer, net, 0)
    group_step.gather(optimizer)
    group = optimizer.param_groups[0]
    if change == "grad set to None":
        params[0].grad = None
    elif change == "data replaced":
        params[2].data = params[2].data.clone()
    elif change == "param swapped":
        group["params"][3] = nn.Parameter(params[3].detach().clone())
        group["params"][3].grad = params[3].grad
    elif change == "param appended":
        extra = nn.Parameter(torch.ones(2))
        extra.grad = torch.ones(2)
        group["params"].append(extra)
    elif change == "group added":
        extra = nn.Parameter(torch.ones(2))
        extra.grad = torch.ones(2)
        optimizer.add_param_group({"params": [extra]})
    elif change == "option changed":
        group["foreach"] = not group["foreach"]
    elif change == "state emptied":
        kept = {p: optimizer.state[p] for p in params}
        optimizer.state.clear()
    else:
        optimizer.load_state_dict(optimizer.state_dict())
    builds.clear()
    steps = group_step.gather(optimizer)
    assert builds and builds[0] == 0
    stepped = [p for s in steps for p in s.params]
    assert stepped == [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    assert all(g is p.grad for s in steps for g, p in zip(s.grads, s.params))
    assert all(state is optimizer.state[p] for s in steps for state, p in zip(s.states, s.params))
    if change == "state emptied":  # a fresh state for every parameter, not the dropped one
        assert all(optimizer.state[p] is not kept[p] for p in params)


def test_a_sparse_gradient_after_kept_steps_is_still_refused():
    net = model()
    optimizer = KOALAPlusPlus(net.parameters(), lr=0.1)
    train_step(optimizer, net, 0)
    group_step.gather(optimizer)
    weight = net[0].weight
    weight.grad = weight.grad.to_sparse()
    assert take(optimizer.param_groups[0]) is None  # no address to read: gathered anew
    with pytest.raises(RuntimeError, match="sparse gradients"):
        group_step.gather(optimizer)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_steps_on_kept_records_equal_steps_on_fresh_ones(variant, set_to_none):
    """A training loop against the same loop with every cache emptied before each step: the same bits."""
    nets = model(), model()
    kept = variant(nets[0].parameters(), lr=0.1, weight_decay=1e-3, foreach=True)
    fresh = variant(nets[1].parameters(), lr=0.1, weight_decay=1e-3, foreach=True)
    for k in range(5):
        train_step(kept, nets[0], k, set_to_none)
        fresh._gathered.clear()
        train_step(fresh, nets[1], k, set_to_none)
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            assert torch.equal(a, b), k


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_a_kept_triton_step_runs_no_python_per_parameter(variant):
    """The host time of a Triton step does not grow with the layers: with its records and batch kept, a step
    makes as many Python calls at 300 parameters as at 3 (what is per parameter runs in C: the fingerprint)."""
    counts = []
    for n in (3, 300):
        params = [nn.Parameter(torch.randn(4)) for _ in range(n)]
        for p in params:
            p.grad = torch.randn(4)
        optimizer = variant(params, fused="triton", weight_decay=1e-4)
        with recording_launches(run=False):
            for _ in range(2):
                optimizer.observe(torch.tensor(1.0))
                optimizer.step()
            counts.append(python_calls(lambda: (optimizer.observe(torch.tensor(1.0)), optimizer.step())))
    assert counts[0] == counts[1], counts


def test_a_group_whose_addresses_cannot_be_read_is_gathered_anew_at_every_step(builds, monkeypatch):
    """A tensor subclass may refuse ``data_ptr`` in its own way: its group is never kept, and it still steps."""
    from koala_hf.optim import gather_cache

    def refuse(tensor):
        raise NotImplementedError("no data_ptr for this subclass")

    monkeypatch.setattr(gather_cache, "_ADDRESS", refuse)
    net = model()
    optimizer = KOALAPlusPlus(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    for k in range(3):
        train_step(optimizer, net, k)
    assert builds == [0, 0, 0]
    assert not any(torch.equal(a, b) for a, b in zip(before, net.parameters()))
