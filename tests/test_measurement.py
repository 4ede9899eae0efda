"""The loss protocol (E1): observe, accumulation, fallback, closures, zero_grad."""

import pytest
import torch

from koala_hf import KOALAPlusPlus, LossMeasurement
from tests.helpers import flat_parameters, per_sample_losses, regression_batches, tiny_network


def test_micro_batches_measure_the_mean_over_every_sample():
    losses = torch.rand(12, dtype=torch.float64)
    split = LossMeasurement()
    split.observe(losses[:4].mean(), losses[:4])
    split.observe(losses[4:].mean(), losses[4:])
    whole = LossMeasurement()
    whole.observe(losses.mean(), losses)
    for a, b in zip(split.consume(), whole.consume()):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)
    torch.testing.assert_close(whole_mean_square(losses), (losses**2).mean())


def whole_mean_square(losses):
    measurement = LossMeasurement()
    measurement.observe(losses.mean(), losses)
    return measurement.consume()[1]


def test_without_per_sample_losses_the_noise_falls_back_to_the_squared_loss():
    measurement = LossMeasurement()
    measurement.observe(torch.tensor(2.0, dtype=torch.float64))
    measurement.observe(torch.tensor(4.0, dtype=torch.float64))
    loss, noise = measurement.consume()
    assert loss.item() == 3.0 and noise.item() == 9.0
    assert not measurement.pending


def test_mixing_per_sample_and_mean_only_observations_is_refused():
    measurement = LossMeasurement()
    measurement.observe(torch.tensor(1.0), torch.ones(3))
    with pytest.raises(ValueError, match="per_sample_losses"):
        measurement.observe(torch.tensor(1.0))


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(2, 2)])
def test_a_non_scalar_loss_is_refused(bad):
    with pytest.raises(ValueError, match="scalar mean loss"):
        LossMeasurement().observe(bad)


def test_an_empty_batch_is_refused():
    with pytest.raises(ValueError, match="empty"):
        LossMeasurement().observe(torch.tensor(1.0), torch.ones(0))


def test_step_without_a_measurement_says_how_to_give_one():
    model = tiny_network()
    optimizer = KOALAPlusPlus(model.parameters())
    (x, y), = regression_batches(1)
    per_sample_losses(model, x, y).mean().backward()
    with pytest.raises(RuntimeError, match=r"observe\(loss\).*closure.*KoalaTrainer"):
        optimizer.step()


def test_zero_grad_discards_a_measurement_no_step_consumed():
    model = tiny_network()
    optimizer = KOALAPlusPlus(model.parameters())
    optimizer.observe(torch.tensor(123.0))
    optimizer.zero_grad()
    assert not optimizer.measurement.pending
    with pytest.raises(RuntimeError, match="needs the loss"):
        optimizer.step()


def step_with_observe(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = per_sample_losses(model, x, y).mean()
    loss.backward()
    optimizer.observe(loss)
    optimizer.step()


def step_with_closure(model, optimizer, x, y):
    def closure():
        optimizer.zero_grad()
        loss = per_sample_losses(model, x, y).mean()
        loss.backward()
        return loss

    returned = optimizer.step(closure)
    assert returned is not None


def step_with_observing_closure(model, optimizer, x, y):
    def closure():
        optimizer.zero_grad()
        losses = per_sample_losses(model, x, y)
        losses.mean().backward()
        optimizer.observe(losses.mean(), losses)
        return losses.mean()

    optimizer.step(closure)


def step_with_per_sample_observe(model, optimizer, x, y):
    optimizer.zero_grad()
    losses = per_sample_losses(model, x, y)
    losses.mean().backward()
    optimizer.observe(losses.mean(), losses)
    optimizer.step()


@pytest.mark.parametrize(
    "closure_step, plain_step",
    [(step_with_closure, step_with_observe), (step_with_observing_closure, step_with_per_sample_observe)],
    ids=["closure-returns-loss", "closure-observes-itself"],
)
def test_a_closure_step_equals_the_observe_protocol(closure_step, plain_step):
    results = []
    for step in (closure_step, plain_step):
        model = tiny_network()
        optimizer = KOALAPlusPlus(model.parameters(), lr=0.5)
        for x, y in regression_batches(5):
            step(model, optimizer, x, y)
        results.append(flat_parameters(model))
    assert torch.equal(results[0], results[1])


def test_a_closure_returning_none_is_refused():
    model = tiny_network()
    optimizer = KOALAPlusPlus(model.parameters())
    with pytest.raises(RuntimeError, match="returned None"):
        optimizer.step(lambda: None)
