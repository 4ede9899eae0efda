"""Every optimizer and variant, through both code paths, follows the spec (E1-E36).

40 float64 steps on a small network, two parameter groups with different
hyperparameters (one estimating R by E2, one with a fixed r), against the
straight-line implementations in ``tests/reference.py``.
"""

import copy

import pytest
import torch

from koala_hf import KOALAM, KOALAV, KOALAPlusPlus
from tests.helpers import (
    flat_parameters,
    per_sample_losses,
    regression_batches,
    relative_error,
    tiny_network,
    train_step,
    weight_and_bias_groups,
)
from tests.reference import KoalaMReference, KoalaPlusPlusReference, KoalaVReference, measurement

STEPS = 40
TOLERANCE = 1e-10


def reference_layers(model, groups):
    """One reference layer per parameter, with its group's hyperparameters (same order as the model)."""
    by_param = {}
    for group in groups:
        for p in group["params"]:
            by_param[p] = {k: v for k, v in group.items() if k != "params"}
    return [{"theta": p.data.view(-1), **by_param[p]} for p in model.parameters()]


def reference_step_inputs(model, x, y):
    losses = per_sample_losses(model, x, y)
    grads = torch.autograd.grad(losses.mean(), list(model.parameters()))
    loss, noise_measurement = measurement(losses.detach())
    return [g.reshape(-1) for g in grads], loss, noise_measurement


KOALA_PP_GROUPS = (
    dict(lr=0.5, sigma=0.1, q=0.1, r=None, alpha_r=0.9, weight_decay=1e-3),
    dict(lr=0.2, sigma=0.2, q=0.05, r=0.5, alpha_r=0.9, weight_decay=0.0),
)


PATHS = {"per-tensor": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True),
         "triton": dict(fused="triton")}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("symmetric", [True, False], ids=["koala++", "koala++ns"])
def test_koala_plus_plus_follows_the_spec(symmetric, path):
    """Every implementation path, the fused kernels included."""
    model = tiny_network()
    reference_model = copy.deepcopy(model)
    optimizer = KOALAPlusPlus(
        weight_and_bias_groups(model, *KOALA_PP_GROUPS), symmetric=symmetric, **PATHS[path]
    )
    reference = KoalaPlusPlusReference(
        reference_layers(reference_model, weight_and_bias_groups(reference_model, *KOALA_PP_GROUPS)),
        symmetric=symmetric,
    )
    for x, y in regression_batches(STEPS):
        train_step(model, optimizer, x, y)
        reference.step(*reference_step_inputs(reference_model, x, y))
    assert relative_error(flat_parameters(model), flat_parameters(reference_model)) < TOLERANCE
    assert not torch.equal(flat_parameters(model), flat_parameters(tiny_network()))


V_GROUPS = (
    dict(lr=0.1, r=None, alpha_r=0.9, weight_decay=1e-3),
    dict(lr=0.05, r=0.5, alpha_r=0.8, weight_decay=0.0),
)


@pytest.mark.parametrize("path", list(PATHS))
def test_koala_v_follows_the_spec(path):
    model = tiny_network()
    reference_model = copy.deepcopy(model)
    optimizer = KOALAV(weight_and_bias_groups(model, *V_GROUPS), sigma=0.1, q=1.0, **PATHS[path])
    reference = KoalaVReference(
        reference_layers(reference_model, weight_and_bias_groups(reference_model, *V_GROUPS)), sigma=0.1, q=1.0
    )
    for x, y in regression_batches(STEPS):
        train_step(model, optimizer, x, y)
        reference.step(*reference_step_inputs(reference_model, x, y))
    assert relative_error(flat_parameters(model), flat_parameters(reference_model)) < TOLERANCE
    assert relative_error(optimizer.state["koala"]["P"], reference.P) < TOLERANCE


M_FILTER = dict(sw=0.1, sc=0.01, sv=0.1, a=0.9, qw=0.01, qv=0.01)
M_GROUPS = (
    dict(lr=0.5, r=None, alpha_r=0.9, weight_decay=1e-3),
    dict(lr=0.2, r=0.5, alpha_r=0.9, weight_decay=0.0),
)


@pytest.mark.parametrize("path", list(PATHS))
def test_koala_m_follows_the_papers_loop(path):
    model = tiny_network()
    reference_model = copy.deepcopy(model)
    optimizer = KOALAM(weight_and_bias_groups(model, *M_GROUPS), **M_FILTER, **PATHS[path])
    reference = KoalaMReference(
        reference_layers(reference_model, weight_and_bias_groups(reference_model, *M_GROUPS)), **M_FILTER
    )
    reference.predict()  # the papers' loop predicts before every forward pass
    for x, y in regression_batches(STEPS):
        train_step(model, optimizer, x, y)
        reference.update(*reference_step_inputs(reference_model, x, y))
        reference.predict()
    # Both now hold the predicted weights the next forward pass would see.
    assert relative_error(flat_parameters(model), flat_parameters(reference_model)) < TOLERANCE
    assert relative_error(optimizer.state["koala"]["P"], reference.P) < TOLERANCE

    # eval() switches to the posterior weights: predicted minus this step's velocity.
    posterior = torch.cat([(layer["theta"] - layer["u"] / M_FILTER["a"]) for layer in reference.layers])
    optimizer.eval()
    assert relative_error(flat_parameters(model), posterior) < TOLERANCE
    optimizer.train()
    assert relative_error(flat_parameters(model), flat_parameters(reference_model)) < TOLERANCE


def test_first_koala_plus_plus_step_has_its_closed_form():
    """E10 into E11-E16: theta_1 = theta_0 - lr L ((1-lam) c + q) / S H with c = sigma + q."""
    model = tiny_network()
    lr, sigma, q = 0.7, 0.3, 0.2
    optimizer = KOALAPlusPlus(model.parameters(), lr=lr, sigma=sigma, q=q)
    (x, y), = regression_batches(1)
    before = [p.detach().clone() for p in model.parameters()]
    losses = per_sample_losses(model, x, y)
    losses.mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.observe(losses.mean(), losses)
    optimizer.step()

    L, m = measurement(losses.detach())
    R = 0.9 * 1.0 + 0.1 * m  # E2 with R_0 = 1
    c = sigma + q
    for p, theta0, H in zip(model.parameters(), before, grads):
        hh = H.reshape(-1).dot(H.reshape(-1))
        lam = c * hh / (c * hh + R)
        S = ((1 - lam) * c + q) * hh + R
        expected = theta0 - lr * L * ((1 - lam) * c + q) / S * H
        assert relative_error(p.detach(), expected) < 1e-13

