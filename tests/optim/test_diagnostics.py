"""The logged signals describe the step that was taken: under a decaying schedule, ``koala/effective_step`` uses
the lr that the step applied (E4, E16), not the one the scheduler set afterwards for the next step."""

import pytest
import torch

from koala_hf import KOALAPlusPlus
from tests.reference import KoalaPlusPlusReference, measurement

STEPS = 5
LR = 0.5


def test_the_effective_step_is_that_of_the_lr_the_step_applied_under_a_linear_decay():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    optimizer = KOALAPlusPlus([weight], lr=LR, sigma=0.1, q=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 - k / STEPS)  # the Trainer's linear decay
    layer = {"theta": weight.detach().clone(), "r": None, "alpha_r": 0.9, "sigma": 0.1, "q": 0.1, "weight_decay": 0.0}
    reference = KoalaPlusPlusReference([layer])
    targets = torch.randn(STEPS, 4, 6, dtype=torch.float64)
    for k in range(STEPS):
        optimizer.zero_grad()
        per_sample = ((targets[k] - weight) ** 2).sum(1)
        per_sample.mean().backward()
        optimizer.observe(per_sample.mean().detach(), per_sample.detach())
        optimizer.step()
        scheduler.step()
        loss, second_moment = measurement(per_sample.detach())
        layer["lr"] = LR * (1.0 - k / STEPS)  # the lr of step k, by the schedule's formula
        reference.step([(2 * (layer["theta"] - targets[k])).mean(0)], loss, second_moment)
        signals = optimizer.diagnostics()
        assert signals["koala/effective_step"] == pytest.approx((layer["lr"] * loss / layer["S_prev"]).item(), rel=1e-9)
        assert signals["koala/innovation_variance"] == pytest.approx(layer["S_prev"].item(), rel=1e-9)
        assert signals["koala/noise_share"] == pytest.approx((reference.R[0] / layer["S_prev"]).item(), rel=1e-9)  # R/S, E15
    assert optimizer.param_groups[0]["lr"] == 0.0  # the schedule has ended; the last step still moved
    assert signals["koala/effective_step"] > 0
    torch.testing.assert_close(weight.detach(), layer["theta"], rtol=1e-10, atol=1e-12)
