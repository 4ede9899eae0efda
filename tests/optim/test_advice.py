"""Advice while it trains (koala_hf.optim.advice): said once, with the figure that triggered it, on runs built
to show each sign. A healthy run that stays silent, and the advice in KoalaTrainer's log: tests/test_trainer.py."""

import logging
import math

import pytest
import torch

from koala_hf import KOALAPlusPlus
from koala_hf.optim.advice import NOISE_SHARE, WINDOW, Reading, TrainingAdvisor
from tests.helpers import per_sample_losses, regression_batches, tiny_network

LOG_EVERY = 25


def train(optimizer, model, batches, scale=1.0, nan_every=0):
    """Train on ``batches`` (targets times ``scale``), reading ``diagnostics()`` every LOG_EVERY steps as a
    Trainer logs; every ``nan_every``-th step measures a non-finite loss. Return the readings."""
    readings = []
    for k, (x, y) in enumerate(batches, start=1):
        optimizer.zero_grad()
        losses = per_sample_losses(model, x, scale * y)
        losses.mean().backward()
        if nan_every and k % nan_every == 0:
            optimizer.observe(torch.tensor(math.nan, dtype=losses.dtype))
        else:
            optimizer.observe(losses.mean().detach(), losses.detach())
        optimizer.step()
        if k % LOG_EVERY == 0:
            readings.append(optimizer.diagnostics())
    return readings


def advice_in(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "koala_hf" and r.levelno == logging.WARNING]


def test_a_loss_noise_that_dominates_s_is_said_once_with_the_sgd_step_it_makes(caplog):
    """Targets scaled by 30: the loss is in the hundreds, E1a's R ~ mean(l^2) dwarfs (v + qH).H, and every step is
    an SGD step of lr L/R (sigma + q) (E15, E16). The advice names that step, computed here from the state."""
    model = tiny_network()
    optimizer = KOALAPlusPlus(model.parameters(), lr=1.0, noise="second_moment")
    with caplog.at_level(logging.WARNING, logger="koala_hf"):
        readings = train(optimizer, model, regression_batches(2 * WINDOW), scale=30.0)
    assert all(r["koala/noise_share"] >= NOISE_SHARE for r in readings)
    advice = advice_in(caplog)
    assert len(advice) == 1, advice  # said once, though the sign lasts the whole run
    # Said at the first reading a full window after the sign was first seen (step LOG_EVERY).
    said_at = LOG_EVERY + WINDOW
    assert f"for the last {WINDOW} steps" in advice[0] and "noise='none'" in advice[0] and "raise lr" in advice[0]
    # The figure: lr L / R (sigma + q) from that reading; rerun to that step to read the state independently.
    model = tiny_network()
    again = KOALAPlusPlus(model.parameters(), lr=1.0, noise="second_moment")
    logging.getLogger("koala_hf").disabled = True
    try:
        train(again, model, regression_batches(2 * WINDOW)[:said_at], scale=30.0)
    finally:
        logging.getLogger("koala_hf").disabled = False
    state = again.state["koala"]
    sgd_step = (1.0 * state["loss"] / state["R"][0] * (0.1 + 0.1)).item()
    assert f"= {sgd_step:.3g}" in advice[0]


def test_many_skipped_steps_are_said_once_with_their_share(caplog):
    """Every 5th step measures a non-finite loss: 20% of the steps change nothing."""
    model = tiny_network()
    optimizer = KOALAPlusPlus(model.parameters(), lr=0.05, noise="none")
    with caplog.at_level(logging.WARNING, logger="koala_hf"):
        train(optimizer, model, regression_batches(2 * WINDOW), nan_every=5)
    advice = advice_in(caplog)
    assert len(advice) == 1, advice
    # First reading at step 25 (5 skipped); said at the first reading WINDOW steps later: 40 of 200 skipped.
    assert f"{WINDOW // 5} of the last {WINDOW} steps were skipped (20%" in advice[0] and "Lower lr" in advice[0]


def test_a_sign_must_last_the_whole_window_at_every_reading():
    advisor = TrainingAdvisor("KOALAPlusPlus", window=100)
    noisy = {"koala/noise_share": 0.95, "koala/effective_step": 0.01}
    quiet = {"koala/noise_share": 0.5, "koala/effective_step": 0.01}
    assert advisor.read(Reading(noisy, steps=10, skipped=0)) == []
    assert advisor.read(Reading(quiet, steps=60, skipped=0)) == []  # the run is broken: it starts again
    assert advisor.read(Reading(noisy, steps=110, skipped=0)) == []
    assert advisor.read(Reading(noisy, steps=200, skipped=0)) == []  # 90 steps so far
    (message,) = advisor.read(Reading(noisy, steps=210, skipped=0))
    assert "95%" in message and "for the last 100 steps" in message and "lr*L/R" not in message  # no sigma + q given
    assert advisor.read(Reading(noisy, steps=400, skipped=0)) == []  # once


def test_skipped_steps_break_a_run_of_noise_dominated_readings():
    """A skipped step leaves S as it was, so a diverging run's stale share is not read as noise dominance."""
    advisor = TrainingAdvisor("KOALAPlusPlus", window=100)
    noisy = {"koala/noise_share": 0.95, "koala/effective_step": 0.01}
    assert advisor.read(Reading(noisy, steps=0, skipped=0)) == []
    assert advisor.read(Reading(noisy, steps=150, skipped=3)) == []  # starts again here
    assert advisor.read(Reading(noisy, steps=200, skipped=3)) == []
    assert len(advisor.read(Reading(noisy, steps=250, skipped=3))) == 1


@pytest.mark.parametrize("skipped, said", [(9, False), (10, True)])
def test_skipped_steps_count_from_the_first_reading(skipped, said):
    advisor = TrainingAdvisor("KOALAV", window=100)
    assert advisor.read(Reading({}, steps=1000, skipped=50)) == []  # what came before the first reading is not counted
    assert bool(advisor.read(Reading({}, steps=1100, skipped=50 + skipped))) is said
