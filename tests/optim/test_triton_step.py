"""koala_hf.optim.triton_step: a step's batch is built once and reused while the addresses hold, rebuilt when
they change, and a reused batch steps exactly as a fresh one (under Triton's interpreter, tests/conftest.py).
"""

import pytest
import torch

from koala_hf import KOALAM, KOALAV, KOALAPlusPlus
from koala_hf.optim import triton_step

VARIANTS = [KOALAPlusPlus, KOALAV, KOALAM]
IDS = ["koala++", "koala-v", "koala-m"]


@pytest.fixture
def builds(monkeypatch):
    """How many StepBatch objects the steps built."""
    built = []
    real = triton_step.StepBatch.__init__

    def counted(self, *args, **kwargs):
        built.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(triton_step.StepBatch, "__init__", counted)
    return built


def layers(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape)) for shape in [(5, 3), (7,), (2, 3, 4)]]


def step(optimizer, params, grads, loss=1.0):
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.observe(torch.tensor(loss))
    optimizer.step()


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_the_batch_is_built_once_while_the_gradients_stay_where_they_are(variant, builds):
    params = layers()
    grads = [torch.randn_like(p) for p in params]
    optimizer = variant(params, fused="triton", lr=0.1, weight_decay=1e-3)
    for k in range(4):
        for g in grads:
            g.normal_()  # new values, same addresses (as a gradient accumulated into in place)
        step(optimizer, params, grads, loss=1.0 + k)
    assert len(builds) == 1


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_gradients_at_new_addresses_are_rebound_and_every_step_equals_a_fresh_batchs(variant, builds):
    """Steps reusing a kept batch, pointing it at gradients elsewhere, and rebuilding it after a state dict is
    loaded, against an optimizer whose batch is built anew at every step (its caches emptied): the same bits."""
    torch.manual_seed(1)
    values = [[torch.randn_like(p) for p in layers()] for _ in range(6)]
    kept, fresh = layers(), layers()
    optimizer = variant(kept, fused="triton", lr=0.1, weight_decay=1e-3)
    reference = variant(fresh, fused="triton", lr=0.1, weight_decay=1e-3)
    held = [torch.empty_like(p) for p in kept]
    for k, grads in enumerate(values):
        if k in (0, 1, 4):  # the same tensors again: the kept batch
            for h, g in zip(held, grads):
                h.copy_(g)
            step(optimizer, kept, held, loss=1.0 + k)
        else:  # new tensors (held stays alive, so they cannot land where it is): the tables rebound
            step(optimizer, kept, [g.clone() for g in grads], loss=1.0 + k)
        if k == 3:
            optimizer.load_state_dict(optimizer.state_dict())  # new state tensors: the batch is dropped
        reference._triton_batches.clear()
        reference._gathered.clear()
        step(reference, fresh, [g.clone() for g in grads], loss=1.0 + k)
        for a, b in zip(kept, fresh):
            assert torch.equal(a, b), k
    # Built at step 0 and at step 4 (after the load); reused at steps 1 and 5, rebound at steps 2 and 3.
    assert len(builds) - 6 == 2


def test_a_gradient_laid_out_otherwise_rebuilds_the_batch(builds):
    """A moved gradient is rebound only where it is laid out as the one it replaces; otherwise (here transposed
    storage, so the layer runs on copies) the batch is built again, and steps as a fresh one."""
    torch.manual_seed(3)
    kept, fresh = [torch.nn.Parameter(torch.randn(4, 3))], [torch.nn.Parameter(torch.randn(4, 3))]
    fresh[0].data.copy_(kept[0].data)
    optimizer = KOALAPlusPlus(kept, fused="triton", lr=0.1)
    reference = KOALAPlusPlus(fresh, fused="triton", lr=0.1)
    for k, grad in enumerate([torch.randn(4, 3), torch.randn(3, 4).t(), torch.randn(4, 3)]):
        step(optimizer, kept, [grad.clone() if grad.is_contiguous() else grad.t().clone().t()], loss=1.0 + k)
        reference._triton_batches.clear()
        step(reference, fresh, [grad.clone()], loss=1.0 + k)
        assert torch.equal(kept[0], fresh[0]), k
    assert len(builds) - 3 == 3  # step 1's gradient is transposed; step 2's is dense again, but the batch was not kept


def test_a_batch_with_layers_on_copies_is_not_kept(builds):
    """A layer whose tensors disagree in layout runs on copies, which hold one step's values: rebuilt every step."""
    torch.manual_seed(2)
    weight = torch.nn.Parameter(torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last))
    optimizer = KOALAPlusPlus([weight], fused="triton", lr=0.1)
    for k in range(3):
        step(optimizer, [weight], [torch.randn(2, 3, 4, 4)], loss=1.0 + k)  # contiguous gradient, channels_last weight
    assert len(builds) == 3
