"""Every variant and path reproduces the trajectory pinned before the core was restructured (tests/optim/pinned.py)."""

import pytest
import torch

from tests.optim.pinned import GROUPS, PIN, cases, trajectory

TOLERANCE = 1e-12


@pytest.fixture(scope="module")
def pins():
    return torch.load(PIN, weights_only=True)


@pytest.mark.parametrize("name, path", cases(), ids=[f"{n}-{p}" for n, p in cases()])
def test_the_pinned_trajectory_is_reproduced(pins, name, path):
    assert_reproduces(pins[f"{name}/{path}"], trajectory(name, path))


@pytest.mark.parametrize("name", list(GROUPS))
def test_a_devices_foreach_path_with_coefficients_on_the_host_reproduces_the_device_pins(pins, name):
    """koala_hf.optim.host_coefficients: the scalar-list update, and the NaN step skipped on the host."""
    assert_reproduces(pins[f"{name}/foreach-masked"], trajectory(name, "foreach-host"))


def assert_reproduces(pinned: dict, replayed: dict) -> None:
    assert set(replayed) == set(pinned)
    for key, expected in pinned.items():
        actual = replayed[key]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, key
        if expected.is_floating_point():
            scale = expected.abs().max().clamp_min(1e-300)
            assert ((actual - expected).abs().max() / scale).item() <= TOLERANCE, key
        else:
            assert torch.equal(actual, expected), key
    assert pinned["filter/skipped_steps"].item() == 1  # the NaN step
    assert not torch.equal(pinned["parameters"][0], pinned["parameters"][-1])
