"""The Triton kernels (``fused="triton"``; ``fused=True`` on CUDA), run on the CPU through Triton's interpreter
(tests/optim/conftest.py sets TRITON_INTERPRET=1): the per-tensor path's steps, a fixed number of launches and
of ATen ops per step whatever the number of layers, and no value read back to the host."""

import pytest
import torch
from torch import nn

from koala_hf import KOALAM, KOALAV, KOALAPlusPlus
from koala_hf.optim.koala_plus_plus import READY, S_PREV
from koala_hf.optim.profiling import counting_launches, step_dispatches
from tests.optim.pinned import GROUPS, PIN, trajectory
from tests.optim.test_fused_step import assert_same_run, batches, run, train

VARIANTS = [KOALAPlusPlus, KOALAV, KOALAM]
IDS = ["koala++", "koala-v", "koala-m"]


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("nan_at", [None, 3], ids=["", "non-finite-step"])
@pytest.mark.parametrize("wide_dtype", [torch.float64, torch.float32], ids=["with-float64", "float32-and-bfloat16"])
def test_the_triton_step_matches_the_per_tensor_step_on_mixed_shapes_layouts_and_dtypes(variant, nan_at, wide_dtype):
    """channels_last, transposed, strided (run on copies), vector, one-element, a layer over several chunks (float64,
    or float32: then KOALA++'s scalar algebra runs in its one-launch kernel, else in torch) and a bfloat16 one; two
    groups, weight decay; a NaN gradient skips the whole step."""
    triton = run({"fused": "triton"}, nan_at, variant, wide_dtype)
    assert_same_run(triton, run({"foreach": False}, nan_at, variant, wide_dtype), rtol=1e-5)
    assert int(triton[1].state["koala"]["skipped_steps"]) == (0 if nan_at is None else 1)


@pytest.mark.parametrize("wide_dtype", [torch.float64, torch.float32], ids=["with-float64", "float32-and-bfloat16"])
def test_an_unstable_layer_restarts_from_e10_as_on_the_per_tensor_path(wide_dtype):
    runs = []
    for path in ({"fused": "triton"}, {"foreach": False}):
        model, optimizer, _ = run(path, wide_dtype=wide_dtype)
        optimizer.state[model.bias]["filter"][S_PREV] = 0.0  # lambda = (b + q a) / S_prev is not finite (E11)
        train(model, optimizer, batches()[:1])
        assert optimizer.state[model.bias]["filter"][READY] == 0  # restarts from E10 at its next step
        train(model, optimizer, batches()[1:3])
        runs.append((model, optimizer, []))
    assert_same_run(runs[0], runs[1], rtol=1e-5)


def test_the_same_run_gives_the_same_bits():
    first, second = run({"fused": "triton"}, wide_dtype=torch.float32), run({"fused": "triton"}, wide_dtype=torch.float32)
    for a, b in zip(first[0].parameters(), second[0].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(GROUPS))
def test_the_triton_step_replays_the_pinned_float64_trajectories_of_the_per_tensor_path(name):
    """Float64, two groups with different hyperparameters and noise modes, a NaN step: to 1e-12 of the pinned
    per-tensor trajectory (tests/optim/pinned.py), each variant's scalar step in its one-launch kernel."""
    pinned = torch.load(PIN, weights_only=True)[f"{name}/per-tensor"]
    with counting_launches() as launches:
        replayed = trajectory(name, "triton")
    fused = {"koala++": "koala_plus_plus_coefficients", "koala++ns": "koala_plus_plus_coefficients",
             "koala-v": "koala_v_coefficients", "koala-m": "koala_m_coefficients"}[name]
    assert fused in launches
    for key, expected in pinned.items():
        if expected.is_floating_point():
            scale = expected.abs().max().clamp_min(1e-300)
            assert ((replayed[key] - expected).abs().max() / scale).item() <= 1e-12, key
        else:
            assert torch.equal(replayed[key], expected), key


def layers(n, dtype=torch.float32):
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(3 + i % 5, 4, dtype=dtype)) for i in range(n)]


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_three_launches_per_dtype_and_one_scalar_step_whatever_the_number_of_layers_and_groups(variant):
    """A reduction, a combination and an update per dtype, and the scalar step in one more launch (KOALA++'s only
    where its layers' filters share the step's dtype: not with float32 and float64 layers mixed, then torch
    computes it)."""
    counts = {}
    for n in (8, 64):
        params = layers(n) + [nn.Parameter(torch.randn(0, 3))]  # an empty one too (an FSDP2 shard can be)
        half = len(params) // 2
        optimizer = variant([{"params": params[:half]}, {"params": params[half:], "weight_decay": 1e-3}],
                            fused="triton", lr=0.1)
        for step in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            with counting_launches() as launches:
                optimizer.observe(torch.tensor(1.0 + step))
                optimizer.step()
        counts[n] = launches
    assert counts[8] == counts[64] and len(counts[64]) == 4
    mixed = layers(4) + layers(4, torch.float64)
    optimizer = variant(mixed, fused="triton", lr=0.1)
    for p in mixed:
        p.grad = torch.randn_like(p)
    with counting_launches() as launches:
        optimizer.observe(torch.tensor(1.0))
        optimizer.step()
    assert len(launches) == (6 if variant is KOALAPlusPlus else 7)  # two dtypes


@pytest.mark.parametrize("variant, bound", [(KOALAPlusPlus, 20), (KOALAV, 20), (KOALAM, 20)], ids=IDS)
def test_the_aten_ops_of_a_cuda_step_do_not_grow_with_the_layers_and_none_reads_the_device(variant, bound):
    """Counted on fake CUDA tensors (no GPU needed): no value is read back to the host (a ``.item()`` would fail
    there, a copy to the host is counted)."""
    counted = {n: step_dispatches(lambda ps: variant(ps, fused=True, lr=0.1, weight_decay=1e-3), [(3, 4)] * n)
               for n in (8, 64)}
    assert counted[8].ops == counted[64].ops <= bound, counted[64].by_op
    assert counted[8].launches == counted[64].launches == 4
    assert "_local_scalar_dense" not in counted[64].by_op and counted[64].host_copies == 0


@pytest.mark.parametrize("noise", ["second_moment", "variance", "none", 0.5])
def test_koalapps_fused_scalar_step_keeps_the_filter_wide_state_as_torch_does(noise):
    """E1, E2 and the counters in the one-launch scalar step: a negative loss, a NaN loss and per-sample losses
    in between, each noise mode (and a fixed r), against the per-tensor path's R, counters and last loss."""
    options = {"r": noise} if isinstance(noise, float) else {"noise": noise}
    states = []
    for path in ({"fused": "triton"}, {"foreach": False}):
        params = layers(5)
        optimizer = KOALAPlusPlus(params, lr=0.1, weight_decay=1e-3, **path, **options)
        generator = torch.Generator().manual_seed(3)
        with counting_launches() as launches:
            for loss in (1.5, -1.0, float("nan"), 2.0, 0.7):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=generator)
                per_sample = torch.rand(6, generator=generator) * 2 * abs(loss) if loss == loss else None
                optimizer.observe(torch.tensor(loss), per_sample)
                optimizer.step()
        assert ("koala_plus_plus_coefficients" in launches) is ("fused" in path)
        states.append(optimizer.state["koala"])
    fused, torch_path = states
    for key in ("step", "skipped_steps", "negative_loss_steps"):
        assert torch.equal(fused[key], torch_path[key]), key
    assert int(fused["skipped_steps"]) == 2 and int(fused["negative_loss_steps"]) == 1
    torch.testing.assert_close(fused["R"], torch_path["R"], rtol=1e-6, atol=0)
    torch.testing.assert_close(fused["loss"], torch_path["loss"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("noise", ["second_moment", "none"])
@pytest.mark.parametrize("variant", [KOALAV, KOALAM], ids=["koala-v", "koala-m"])
def test_koala_v_and_ms_fused_scalar_step_keeps_its_covariance_and_the_filter_wide_state_as_torch_does(variant, noise):
    """Negative and NaN losses between taken steps: the counters equal, R, the loss and the covariance (KOALA-M's
    2x2 P and qw_avg) and the parameters as the per-tensor path keeps them."""
    states = []
    kernel = {KOALAV: "koala_v_coefficients", KOALAM: "koala_m_coefficients"}[variant]
    for path in ({"fused": "triton"}, {"foreach": False}):
        params = layers(5)
        optimizer = variant(params, lr=0.1, weight_decay=1e-3, noise=noise, **path)
        generator = torch.Generator().manual_seed(4)
        with counting_launches() as launches:
            for loss in (1.5, -1.0, float("nan"), 2.0, 0.7):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=generator)
                optimizer.observe(torch.tensor(loss))
                optimizer.step()
        assert (kernel in launches) is ("fused" in path)
        states.append((optimizer.state["koala"], [p.detach().clone() for p in params]))
    (fused, fused_params), (torch_path, torch_params) = states
    for key in ("step", "skipped_steps", "negative_loss_steps"):
        assert torch.equal(fused[key], torch_path[key]), key
    for key in ("R", "loss", "P") + (("qw_avg",) if variant is KOALAM else ()):
        torch.testing.assert_close(fused[key], torch_path[key], rtol=1e-6, atol=1e-12)
    for a, b in zip(fused_params, torch_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
