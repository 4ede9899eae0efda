"""KOALA in a hand-written Accelerate loop: accumulate, backward, observe through the wrapper."""

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

import koala_hf
from koala_hf import KOALAPlusPlus
from tests.helpers import flat_parameters, per_sample_losses, regression_batches, tiny_network, train_step


def test_an_accelerate_loop_with_accumulation_equals_full_batches():
    batches = regression_batches(4, batch=8)
    reference = tiny_network()
    reference_optimizer = KOALAPlusPlus(reference.parameters(), lr=0.5)
    for x, y in batches:
        train_step(reference, reference_optimizer, x, y)

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_network()
    data = TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    model, optimizer, loader = accelerator.prepare(
        model, KOALAPlusPlus(model.parameters(), lr=0.5), DataLoader(data, batch_size=4, shuffle=False)
    )
    assert koala_hf.koala_optimizer(optimizer) is not None
    for x, y in loader:
        with accelerator.accumulate(model):
            losses = per_sample_losses(model, x, y)
            accelerator.backward(losses.mean())
            koala_hf.observe(optimizer, losses.mean(), losses)
            optimizer.step()
            optimizer.zero_grad()
    assert koala_hf.koala_optimizer(optimizer).state["koala"]["step"].item() == 4
    torch.testing.assert_close(flat_parameters(model), flat_parameters(reference), rtol=1e-10, atol=1e-13)


def test_observe_refuses_optimizers_that_are_not_koala():
    model = tiny_network()
    with pytest.raises(TypeError, match="not a KOALA optimizer"):
        koala_hf.observe(torch.optim.SGD(model.parameters(), lr=0.1), torch.tensor(1.0))
