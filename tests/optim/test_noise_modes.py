"""The measurement-noise modes (E1a-E1c): each gives the R_k its equation says, per group, saved and restored."""

import io

import pytest
import torch

from koala_hf import OPTIMIZERS, create_optimizer
from tests.helpers import per_sample_losses, regression_batches, tiny_network

MODES = ("second_moment", "variance", "none")


def expected_measurement(mode: str, losses: torch.Tensor) -> torch.Tensor:
    """m_k of E1a, E1b, E1c over one step's per-sample losses."""
    if mode == "second_moment":
        return (losses**2).mean()
    if mode == "variance":
        return (losses**2).mean() - losses.mean() ** 2
    return torch.zeros((), dtype=losses.dtype)


def step_with(optimizer, model, x, y, micro_batches: int = 1):
    """One step whose measurement arrives in ``micro_batches`` observe() calls; returns all per-sample losses."""
    optimizer.zero_grad()
    seen = []
    for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        losses = per_sample_losses(model, xs, ys)
        (losses.mean() / micro_batches).backward()
        optimizer.observe(losses.mean(), losses)
        seen.append(losses.detach())
    optimizer.step()
    return torch.cat(seen)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_mode_gives_the_noise_estimate_of_its_equation(name, mode):
    model = tiny_network()
    optimizer = create_optimizer(name, model.parameters(), lr=0.1, noise=mode, alpha_r=0.9)
    expected = torch.tensor(1.0, dtype=torch.float64)  # R_0 = 1 (E2)
    for x, y in regression_batches(4, batch=32):
        losses = step_with(optimizer, model, x, y)
        expected = 0.9 * expected + 0.1 * expected_measurement(mode, losses)  # E2 with E1a/E1b/E1c
        torch.testing.assert_close(optimizer.state["koala"]["R"][0], expected, rtol=1e-12, atol=0)
    if mode == "none":
        assert optimizer.state["koala"]["R"][0].item() == pytest.approx(0.9**4)  # fading to 0


@pytest.mark.parametrize("mode", MODES)
def test_accumulated_micro_batches_measure_the_whole_step(mode):
    """4 x 8 samples give the R of one batch of 32: E1b's variance over the step's full sample set."""
    runs = []
    for micro_batches in (1, 4):
        model = tiny_network()
        optimizer = create_optimizer("koala++", model.parameters(), lr=0.1, noise=mode)
        for x, y in regression_batches(3, batch=32):
            step_with(optimizer, model, x, y, micro_batches)
        runs.append(optimizer.state["koala"]["R"].clone())
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-12, atol=1e-15)


def test_variance_without_per_sample_losses_is_zero():
    model = tiny_network()
    optimizer = create_optimizer("koala++", model.parameters(), noise="variance")
    x, y = regression_batches(1)[0]
    loss = per_sample_losses(model, x, y).mean()
    loss.backward()
    optimizer.observe(loss)
    optimizer.step()
    assert optimizer.state["koala"]["R"][0].item() == pytest.approx(0.9)


def test_modes_are_per_group_and_a_fixed_r_overrides_them():
    model = tiny_network()
    params = list(model.parameters())
    optimizer = create_optimizer("koala++", [
        {"params": params[:2], "noise": "none"}, {"params": params[2:4], "noise": "second_moment"},
        {"params": params[4:], "noise": "none", "r": 0.5},
    ], lr=0.1)
    x, y = regression_batches(1)[0]
    losses = step_with(optimizer, model, x, y)
    R = optimizer.state["koala"]["R"]
    torch.testing.assert_close(R, torch.stack([torch.tensor(0.9, dtype=torch.float64),
                                               0.9 + 0.1 * (losses**2).mean(), torch.tensor(0.5, dtype=torch.float64)]))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_an_unknown_mode_is_refused_naming_the_choices(name):
    with pytest.raises(ValueError, match=r"Invalid noise: 'variance2'; it must be one of second_moment, variance, none"):
        create_optimizer(name, tiny_network().parameters(), noise="variance2")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_mode_survives_a_state_dict_round_trip(name):
    model = tiny_network()
    optimizer = create_optimizer(name, model.parameters(), lr=0.1, noise="none")
    x, y = regression_batches(1)[0]
    step_with(optimizer, model, x, y)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    fresh = create_optimizer(name, model.parameters(), lr=0.1)  # constructed with the default mode
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.param_groups[0]["noise"] == "none"
