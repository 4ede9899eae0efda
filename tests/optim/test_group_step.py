"""koala_hf.optim.group_step: the per-group records a step runs over, and the completion of their sums."""

import pytest
import torch
from torch import nn

from koala_hf import KOALAPlusPlus
from koala_hf.optim.dispatch import Backend
from koala_hf.optim.group_step import complete_sums, gather


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
    assert first.jacobians[0] is a.grad  # no weight decay: H is the gradient itself (E3)
    torch.testing.assert_close(second.jacobians[0], b.grad + 0.1 * b.detach())
    assert second.weight_decay == 0.1 and second.state_shards("v")[0] is optimizer.state[b]["v"]


def test_fused_records_leave_h_to_the_kernels():
    optimizer, _ = optimizer_with_grads(fused=True)
    assert all(step.backend is Backend.FUSED_CPU and step.jacobians is None for step in gather(optimizer))


def test_sparse_gradients_are_refused():
    p = nn.Parameter(torch.randn(3))
    optimizer = KOALAPlusPlus([p])
    p.grad = torch.randn(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        gather(optimizer)


def test_completed_sums_land_in_the_records_and_a_non_finite_sum_clears_ok():
    optimizer, _ = optimizer_with_grads()
    steps = gather(optimizer)
    sums = [torch.ones(1, 4), torch.ones(1, 4)]
    ok = complete_sums(steps, sums, torch.tensor(True), "KOALAPlusPlus")
    assert bool(ok) and steps[0].sums is sums[0]
    sums[1][0, 2] = float("inf")
    assert not bool(complete_sums(steps, sums, torch.tensor(True), "KOALAPlusPlus"))
