"""Float64 trajectories of every variant and path, pinned before the optimizer core was restructured (issue 20).

``pinned_trajectories.pt`` holds, per case, the parameters after each of 20 steps and the filter-wide state at
the end. ``test_pinned_trajectories.py`` replays each case and asserts it reproduces the pin to 1e-12 relative:
a refactoring that changes what a step computes fails there. Regenerate only for a deliberate change of the
numbers (and say so in the commit)::

    python -m tests.optim.pinned
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from koala_hf import create_optimizer
from koala_hf.optim import host_coefficients, layers
from tests.helpers import flat_parameters, per_sample_losses, regression_batches, tiny_network, weight_and_bias_groups

PIN = Path(__file__).with_name("pinned_trajectories.pt")
STEPS = 20
NAN_STEP = 11  # a step whose gradient is NaN: skipped, nothing moves
# Two groups with non-default hyperparameters (one estimating R with E1b, one with a fixed r).
GROUPS = {
    "koala++": ({"lr": 0.5, "sigma": 0.2, "q": 0.05, "weight_decay": 1e-3, "noise": "variance"},
                {"lr": 0.2, "sigma": 0.1, "q": 0.1, "r": 0.5}),
    "koala++ns": ({"lr": 0.5, "sigma": 0.2, "q": 0.05, "weight_decay": 1e-3, "alpha_r": 0.8},
                  {"lr": 0.2, "noise": "none"}),
    "koala-v": ({"lr": 0.1, "weight_decay": 1e-3, "noise": "variance"}, {"lr": 0.05, "r": 0.5, "alpha_r": 0.8}),
    "koala-m": ({"lr": 0.5, "weight_decay": 1e-3}, {"lr": 0.2, "r": 0.5, "noise": "variance"}),
}
FILTER = {"koala++": {}, "koala++ns": {}, "koala-v": {"sigma": 0.2, "q": 0.5},
          "koala-m": {"sw": 0.1, "sc": 0.01, "sv": 0.1, "a": 0.8, "qw": 0.02, "qv": 0.01}}
PATHS = {"per-tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True},
         "foreach-masked": {"foreach": True}}
TRITON = {"triton": {"fused": "triton"}}  # replayed against the per-tensor pins (under Triton's interpreter)
# The foreach path that devices other than the CPU take: multi-tensor sums, the coefficients read to the host
# (koala_hf.optim.host_coefficients). Replayed against the foreach-masked pins, which it must reproduce.
HOST = {"foreach-host": {"foreach": True}}


@contextlib.contextmanager
def masked_like_a_device(path: str):
    """``foreach-masked``: the masked, synchronisation-free foreach update with coefficients on the device, and
    the multi-tensor sums of a device; ``foreach-host``: the foreach path of a device, coefficients on the host."""
    if path not in ("foreach-masked", "foreach-host"):
        yield
        return
    saved = layers.HOST_READABLE, layers.PER_LAYER_SUMS, host_coefficients.DEVICE_COEFFICIENTS
    layers.HOST_READABLE, layers.PER_LAYER_SUMS = (), ()
    if path == "foreach-host":
        host_coefficients.DEVICE_COEFFICIENTS = ()
    try:
        yield
    finally:
        layers.HOST_READABLE, layers.PER_LAYER_SUMS, host_coefficients.DEVICE_COEFFICIENTS = saved


def trajectory(name: str, path: str) -> dict[str, torch.Tensor]:
    model = tiny_network()
    optimizer = create_optimizer(name, weight_and_bias_groups(model, *GROUPS[name]), **FILTER[name], **{**PATHS, **TRITON, **HOST}[path])
    steps = []
    with masked_like_a_device(path):
        for index, (x, y) in enumerate(regression_batches(STEPS)):
            optimizer.zero_grad()
            losses = per_sample_losses(model, x, y)
            loss = losses.mean()
            loss.backward()
            if index == NAN_STEP:
                next(model.parameters()).grad[0, 0] = float("nan")
            optimizer.observe(loss, losses)
            optimizer.step()
            steps.append(flat_parameters(model))
    filter_state = {key: value for key, value in optimizer.state["koala"].items() if isinstance(value, torch.Tensor)}
    return {"parameters": torch.stack(steps), **{f"filter/{k}": v.clone() for k, v in filter_state.items()}}


def cases() -> list[tuple[str, str]]:
    return [(name, path) for name in GROUPS for path in PATHS]


def main() -> None:
    pins = {f"{name}/{path}": trajectory(name, path) for name, path in cases()}
    torch.save(pins, PIN)
    print(f"wrote {PIN} ({len(pins)} cases)")


if __name__ == "__main__":
    main()
