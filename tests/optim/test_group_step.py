"""koala_hf.optim.group_step: the per-group records a step runs over, and the completion of their sums."""

import pytest
import torch
from torch import nn

from koala_hf import KOALAPlusPlus
from koala_hf.optim import layouts
from koala_hf.optim.dispatch import Backend
from koala_hf.optim.group_step import complete_sums, gather
from koala_hf.optim.koala_plus_plus import REDUCTIONS


def optimizer_with_grads(**options):
    a, b, frozen = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(4))
    optimizer = KOALAPlusPlus([{"params": [a, frozen]}, {"params": [b], "weight_decay": 0.1}], **options)
    a.grad, b.grad = torch.randn(3, 2), torch.randn(2)
    return optimizer, (a, b, frozen)


def test_a_record_per_group_with_a_gradient_holding_what_the_step_needs():
    optimizer, (a, b, frozen) = optimizer_with_grads(foreach=True)
    first, second = gather(optimizer)
    assert (first.index, second.index) == (0, 1)
    assert first.params == [a] and frozen not in optimizer.state  # grad None: not stepped, no state
    assert first.backend is Backend.FOREACH and first.states == [optimizer.state[a]]
    assert second.weight_decay == 0.1 and second.state_shards("v")[0] is optimizer.state[b]["v"]
    lists = second.lists(layouts.KOALA_PLUS_PLUS)  # in the layout's order of lists
    assert [t is expected for t, expected in zip([x[0] for x in lists], [b, b.grad, optimizer.state[b]["H_prev"],
                                                                       optimizer.state[b]["v"]])] == [True] * 4
    assert second.layers(layouts.KOALA_PLUS_PLUS) == [tuple(x[0] for x in lists)]


@pytest.mark.parametrize("backend", [Backend.PER_TENSOR, Backend.FOREACH])
def test_an_eager_reduction_forms_h_and_hands_it_to_the_update_as_its_plan(backend):
    optimizer, (a, b, _) = optimizer_with_grads(foreach=backend is Backend.FOREACH)
    steps = gather(optimizer)
    with torch.no_grad():  # as in step()
        prepared = REDUCTIONS[backend](optimizer, steps, torch.device("cpu"), torch.float32)
    first, second = prepared.plan
    assert first[0] is a.grad  # no weight decay: H is the gradient itself (E3)
    torch.testing.assert_close(second[0], b.grad + 0.1 * b.detach())
    assert prepared.sums[1][0, layouts.KOALA_PLUS_PLUS.position("sums", "hh")] == pytest.approx(float(second[0].square().sum()))


def test_fused_records_leave_h_to_the_kernels():
    optimizer, _ = optimizer_with_grads(fused=True)
    assert all(step.backend is Backend.FUSED_CPU for step in gather(optimizer))
    assert REDUCTIONS[Backend.FUSED_CPU](optimizer, gather(optimizer), torch.device("cpu"), torch.float32)[0].shape == (1, 4)


def test_sparse_gradients_are_refused():
    p = nn.Parameter(torch.randn(3))
    optimizer = KOALAPlusPlus([p])
    p.grad = torch.randn(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        gather(optimizer)


def test_completed_sums_are_returned_and_a_non_finite_sum_clears_ok():
    optimizer, _ = optimizer_with_grads()
    steps = gather(optimizer)
    sums = [torch.ones(1, 4), torch.ones(1, 4)]
    whole, ok = complete_sums(steps, sums, torch.tensor(True), "KOALAPlusPlus")
    assert bool(ok) and whole[0] is sums[0]  # one process: the local sums are the whole layers'
    sums[1][0, 2] = float("inf")
    assert not bool(complete_sums(steps, sums, torch.tensor(True), "KOALAPlusPlus").ok)
