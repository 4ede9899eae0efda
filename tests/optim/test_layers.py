"""koala_hf.optim.layers: per-layer building blocks (E3's H, reductions, masking, buckets, the CPU workspace)."""

import gc

import pytest
import torch

from koala_hf.optim import layers
from koala_hf.optim.layers import (
    StepWorkspace,
    add_scaled_,
    blend_,
    bucketed_rows,
    dot,
    dots,
    finite_mask,
    group_by_device_and_dtype,
    measurement_jacobians,
    reduction_dtype,
    skipped_on_host,
    widen,
    write_back,
)


def test_reductions_run_in_float32_or_wider():
    assert reduction_dtype(torch.bfloat16) is torch.float32 and reduction_dtype(torch.float16) is torch.float32
    assert reduction_dtype(torch.float32) is torch.float32 and reduction_dtype(torch.float64) is torch.float64
    x = torch.full((4096,), 1.0 + 2**-7, dtype=torch.bfloat16)  # bf16 rounding would lose the sum's low bits
    assert dot(x, x, torch.float32).item() == (4096 * (1.0 + 2**-7) ** 2)


def test_h_is_the_gradient_itself_without_weight_decay_and_g_plus_wd_theta_with_it():
    torch.manual_seed(0)
    params, grads = [torch.randn(3, 2), torch.randn(4)], [torch.randn(3, 2), torch.randn(4)]
    for foreach in (False, True):
        same = measurement_jacobians(params, grads, 0.0, foreach)
        assert all(h is g for h, g in zip(same, grads))
        with_decay = measurement_jacobians(params, grads, 0.1, foreach)
        for h, g, p in zip(with_decay, grads, params):
            torch.testing.assert_close(h, g + 0.1 * p)  # to rounding: add(alpha=) may fuse the multiply
    out = [torch.empty(3, 2), torch.empty(4)]
    assert measurement_jacobians(params, grads, 0.1, True, out=out) is out
    torch.testing.assert_close(out[1], grads[1] + 0.1 * params[1])


def test_the_workspace_reuses_its_buffers_rebuilds_them_on_a_new_layout_and_forgets_dropped_parameters():
    workspace = StepWorkspace()
    p = torch.nn.Parameter(torch.randn(3, 4))
    first = workspace.get([p], [p.detach()])
    assert workspace.get([p], [p.detach()])[0] is first[0]
    assert workspace.get([p], [p.detach().t()])[0] is not first[0]  # other strides: a new buffer
    assert workspace.get([p], [torch.zeros(3, device="meta")]) is None  # off the CPU: none (CUDA caches its own)
    del p, first
    gc.collect()
    assert len(workspace._buffers) == 0


def test_a_skipped_step_is_skipped_on_the_host_and_masked_on_a_device():
    assert skipped_on_host(torch.tensor(False)) and not skipped_on_host(torch.tensor(True))
    assert not skipped_on_host(torch.tensor(False, device="meta"))  # would need a sync: mask instead


def test_masking_zeroes_a_non_finite_step_without_writing_into_the_users_gradients():
    grads = [torch.tensor([1.0, float("nan")]), torch.tensor([2.0])]
    masked = finite_mask(grads, torch.tensor(False), owned=False)
    assert all(torch.equal(m, torch.zeros_like(m)) for m in masked)
    assert torch.isnan(grads[0][1])  # untouched
    owned = [g.clone() for g in grads]
    assert finite_mask(owned, torch.tensor(False), owned=True) is owned and owned[0].eq(0).all()
    assert finite_mask(grads, torch.tensor(True), owned=False) is grads


def test_low_precision_arithmetic_runs_on_float32_copies_written_back():
    low, wide = torch.ones(3, dtype=torch.bfloat16), torch.ones(3)
    copies = widen([low, wide])
    assert copies[0].dtype is torch.float32 and copies[1] is wide
    copies[0].add_(2**-9)  # below bf16's resolution at 1
    write_back([low, wide], copies)
    assert low.dtype is torch.bfloat16 and torch.equal(low, torch.ones(3, dtype=torch.bfloat16))


def test_buckets_keep_each_tensors_index_and_rows_come_back_in_layer_order():
    tensors = [torch.zeros(2), torch.zeros(2, dtype=torch.float64), torch.zeros(3), torch.zeros(1, dtype=torch.float64)]
    buckets = group_by_device_and_dtype([tensors, tensors])
    assert [indices for _, indices in buckets.values()] == [[0, 2], [1, 3]]
    rows = bucketed_rows([tensors], lambda ts: torch.stack([torch.tensor([float(t.numel())], dtype=t.dtype) for t in ts]))
    assert rows.dtype is torch.float64 and rows[:, 0].tolist() == [2.0, 2.0, 3.0, 1.0]


@pytest.mark.parametrize("off_the_cpu", [False, True], ids=["per-layer", "multi-tensor"])
@pytest.mark.parametrize("accumulate", [None, torch.float64], ids=["each-layers", "float64"])
def test_the_foreach_sums_equal_float64_dot_products_for_any_mix_of_layers(monkeypatch, off_the_cpu, accumulate):
    """Multi-tensor sums where a device would take them (PER_LAYER_SUMS emptied), per-layer dots for the 16-bit
    layers and the rest, every row in layer order: against float64 ``torch.dot`` of the same values."""
    if off_the_cpu:
        monkeypatch.setattr(layers, "PER_LAYER_SUMS", ())
    torch.manual_seed(0)
    xs = [torch.randn(5, 7), torch.randn(3, dtype=torch.bfloat16), torch.randn(4, 6, dtype=torch.float64),
          torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last), torch.randn(0), torch.randn(9)]
    ys = [torch.randn_like(x) for x in xs]
    for others in (None, ys):
        pairs = [(x.double().reshape(-1), (x if others is None else y).double().reshape(-1)) for x, y in zip(xs, ys)]
        expected = torch.stack([torch.dot(x, y) for x, y in pairs])
        magnitude = torch.stack([torch.dot(x.abs(), y.abs()) for x, y in pairs])  # a float32 sum's error scales with it
        actual = dots(xs, others, accumulate, True, torch.device("cpu"))
        assert actual.dtype == torch.float64  # float64 layers (or accumulation) widen the whole column
        assert ((actual - expected).abs() <= 1e-6 * magnitude).all(), (actual - expected) / magnitude
    # One dtype, off the CPU: one multi-tensor column, in that dtype, equal to per-layer float32 dots.
    single = [x.float() for x in xs]
    column = dots(single, [y.float() for y in ys], None, True, torch.device("cpu"))
    assert column.dtype == torch.float32
    expected = torch.stack([dot(x, y.float(), torch.float32) for x, y in zip(single, ys)])
    magnitude = torch.stack([dot(x.abs(), y.float().abs(), torch.float32) for x, y in zip(single, ys)])
    assert ((column - expected).abs() <= 1e-6 * magnitude).all()


def foreach_dispatches(variant: str, n_layers: int):
    from koala_hf import create_optimizer
    from koala_hf.optim.profiling import step_dispatches

    make = lambda ps: create_optimizer(variant, ps, lr=0.1, weight_decay=1e-3, foreach=True)  # noqa: E731
    try:
        return step_dispatches(make, [(3, 4)] * n_layers)
    except RuntimeError as error:  # torch 2.4's fake tensors initialise CUDA when a step runs on them
        if "CUDA" not in str(error):
            raise
        pytest.skip(f"this torch cannot step on fake CUDA tensors ({str(error).splitlines()[0]})")


@pytest.mark.parametrize("variant", ["koala++", "koala-v", "koala-m"])
def test_on_a_device_the_foreach_steps_launches_do_not_grow_with_the_layers(variant):
    """Counted on fake CUDA tensors: the sums and the update are multi-tensor ops on torch's fast route (no dot
    and no kernel per layer: the coefficients are read to the host once, koala_hf.optim.host_coefficients), and
    a step that is ok masks nothing."""
    counted = {n: foreach_dispatches(variant, n) for n in (8, 16, 148)}
    assert counted[8].ops == counted[16].ops == counted[148].ops, {n: c.ops for n, c in counted.items()}
    assert "dot" not in counted[16].by_op and "_local_scalar_dense" not in counted[16].by_op
    assert counted[8].host_copies == counted[148].host_copies == 1  # every group's coefficients and ok, at once


@pytest.mark.parametrize("variant", ["koala++", "koala-v", "koala-m"])
def test_at_gpt2_size_the_foreach_step_launches_within_twice_adamw_foreachs_ops(variant):
    """Issue 26's target at GPT-2 124M's 148 tensors: within 2x AdamW foreach's count, the slow route's kernels
    counted (AdamW foreach reads each tensor's step count on the host: 307 ops)."""
    from koala_hf.optim.profiling import step_dispatches

    counted = foreach_dispatches(variant, 148)
    adamw = step_dispatches(lambda ps: torch.optim.AdamW(ps, foreach=True), [(3, 4)] * 148)
    assert counted.ops <= 2 * adamw.ops, (counted.ops, adamw.ops)


def ops_of(fn) -> dict:
    from koala_hf.optim.profiling import CountOps

    with CountOps() as counter:
        fn()
    return dict(counter.ops)


@pytest.mark.parametrize("scales", [[0.5, 0.5, 0.5], [0.5, -2.0, 3.0]], ids=["one number", "a number each"])
def test_a_scaled_add_with_numbers_equals_the_tensor_path_and_needs_no_temporary_for_one_number(scales):
    torch.manual_seed(0)
    xs, ys = [torch.randn(5, dtype=torch.float64) for _ in scales], [torch.randn(5, dtype=torch.float64) for _ in scales]
    expected = [x.clone() for x in xs]
    add_scaled_(expected, ys, [torch.tensor(s, dtype=torch.float64) for s in scales])
    ops = ops_of(lambda: add_scaled_(xs, ys, scales))
    torch.testing.assert_close(xs, expected, rtol=1e-15, atol=1e-15)
    assert ops == ({"_foreach_add_": 1} if len(set(scales)) == 1 else {"_foreach_mul": 1, "_foreach_add_": 1})


@pytest.mark.parametrize("keep, take", [([0.0, 0.0], [1.0, 1.0]), ([0.0, 1.0], [1.0, 0.0]), ([0.5, 0.0], [2.0, 1.0])])
def test_a_blend_keeps_and_takes_as_told_and_is_a_copy_where_every_layer_takes_the_new_values(keep, take):
    """E17's ``H_prev <- keep_hp H_prev + take_h H``: a step that updates every layer copies ``H``."""
    torch.manual_seed(1)
    xs, ys = [torch.randn(4, dtype=torch.float64) for _ in keep], [torch.randn(4, dtype=torch.float64) for _ in keep]
    expected = [k * x + t * y for x, y, k, t in zip(xs, ys, keep, take)]
    ops = ops_of(lambda: blend_(xs, ys, keep, take))
    torch.testing.assert_close(xs, expected, rtol=1e-15, atol=1e-15)
    assert ("_foreach_copy_" in ops) == (keep == [0.0, 0.0] and take == [1.0, 1.0]), ops
