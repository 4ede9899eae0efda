"""koala_hf.trainer_measurement: KoalaTrainer's measurement routes, decided and kept by one object.

The routes end to end (the loss each reaches the step with, against an independent computation) are in
tests/test_trainer.py, tests/integrations and the distributed tests; here, the decision and the states."""

import logging

import pytest
import torch

from koala_hf.trainer_measurement import Route, TrainerMeasurement, check_per_sample_losses


class Observer:
    def __init__(self):
        self.observed = []

    def observe(self, loss, losses=None):
        self.observed.append((loss, losses))


def decide(losses, loss, normalised=False, num_items_in_batch=None, num_processes=1, forwards=1):
    return check_per_sample_losses(losses, torch.as_tensor(loss), num_items_in_batch=num_items_in_batch,
                                   normalised=normalised, num_processes=num_processes, forwards=forwards,
                                   trainer="KoalaTrainer", model="Model")


def test_per_sample_losses_averaging_to_the_loss_keep_the_per_sample_route():
    losses = torch.tensor([1.0, 2.0, 4.0, 5.0])
    assert decide(losses, 3.0) == (Route.PER_SAMPLE, None)
    # normalised by the step's token count (8 over two micro-batches): this micro-batch's sum / 8
    assert decide(losses, 12.0 / 8, normalised=True, num_items_in_batch=8) == (Route.PER_SAMPLE, None)
    # average_tokens_across_devices: the Trainer multiplies the loss by the number of processes
    assert decide(losses, 2 * 12.0 / 8, normalised=True, num_items_in_batch=8, num_processes=2)[0] is Route.PER_SAMPLE


def test_a_model_ignoring_the_token_count_is_rescaled_with_a_notice():
    losses = torch.tensor([1.0, 2.0, 4.0, 5.0])
    route, notice = decide(losses, 3.0, normalised=True, num_items_in_batch=8)  # its own mean, not sum / 8
    assert route is Route.RESCALED and route.per_sample and "ignores num_items_in_batch" in notice


def test_no_losses_or_losses_that_do_not_average_to_the_loss_fall_back_with_the_cause():
    route, notice = decide(None, 3.0, forwards=2)
    assert route is Route.BACKPROPAGATED and "2 forward passes" in notice and "loss**2" in notice
    route, notice = decide(torch.tensor([1.0, 2.0]), 3.0)
    assert route is Route.BACKPROPAGATED and not route.per_sample
    assert "(3)" in notice and "(1.5)" in notice  # the loss returned, and the derived mean


def test_the_per_sample_route_observes_each_micro_batch_and_the_fallback_sums_the_step():
    optimizer, measurement = Observer(), TrainerMeasurement(Route.PER_SAMPLE)
    measurement.begin_micro_batch()
    assert measurement.in_training_step
    measurement.observe_per_sample(optimizer, torch.tensor([1.0, 3.0]))
    assert measurement.end_micro_batch(torch.tensor(9.0)) is False and not measurement.in_training_step
    assert optimizer.observed[0][0].item() == 2.0 and measurement.backpropagated is None

    fallback = TrainerMeasurement(Route.BACKPROPAGATED)
    for contribution in (0.5, 0.25):  # two micro-batches, each already divided for accumulation
        fallback.begin_micro_batch()
        assert fallback.end_micro_batch(torch.tensor(contribution, dtype=torch.float64)) is True
    fallback.feed(optimizer)
    assert optimizer.observed[1] == (pytest.approx(0.75), None) and fallback.backpropagated is None
    fallback.feed(optimizer)  # nothing left: nothing observed
    assert len(optimizer.observed) == 2


def test_a_fallback_is_said_once(caplog):
    measurement = TrainerMeasurement(Route.UNCHECKED)
    with caplog.at_level(logging.WARNING):
        measurement.settle(Route.BACKPROPAGATED, "first cause")
        measurement.notice("second cause")
    assert measurement.route is Route.BACKPROPAGATED and measurement.noticed
    assert [r.message for r in caplog.records if "cause" in r.message] == ["first cause"]
