"""The Triton kernels (``fused="triton"``; ``fused=True`` on CUDA), run on the CPU through Triton's interpreter
(tests/optim/conftest.py sets TRITON_INTERPRET=1): the per-tensor path's steps, a fixed number of launches and
of ATen ops per step whatever the number of layers, and no value read back to the host."""

import pytest
import torch
from torch import nn

from koala_hf import KOALAM, KOALAV, KOALAPlusPlus
from koala_hf.optim.koala_plus_plus import READY, S_PREV
from koala_hf.optim.profiling import counting_launches, step_dispatches
from tests.optim.test_fused_step import assert_same_run, batches, run, train

VARIANTS = [KOALAPlusPlus, KOALAV, KOALAM]
IDS = ["koala++", "koala-v", "koala-m"]


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("nan_at", [None, 3], ids=["", "non-finite-step"])
def test_the_triton_step_matches_the_per_tensor_step_on_mixed_shapes_layouts_and_dtypes(variant, nan_at):
    """channels_last, transposed, strided (run on copies), vector, one-element, a float64 layer over several
    chunks and a bfloat16 one; two groups, weight decay; a NaN gradient skips the whole step."""
    triton = run({"fused": "triton"}, nan_at, variant)
    assert_same_run(triton, run({"foreach": False}, nan_at, variant), rtol=1e-5)
    assert int(triton[1].state["koala"]["skipped_steps"]) == (0 if nan_at is None else 1)


def test_an_unstable_layer_restarts_from_e10_as_on_the_per_tensor_path():
    runs = []
    for path in ({"fused": "triton"}, {"foreach": False}):
        model, optimizer, _ = run(path)
        optimizer.state[model.bias]["filter"][S_PREV] = 0.0  # lambda = (b + q a) / S_prev is not finite (E11)
        train(model, optimizer, batches()[:1])
        assert optimizer.state[model.bias]["filter"][READY] == 0  # restarts from E10 at its next step
        train(model, optimizer, batches()[1:3])
        runs.append((model, optimizer, []))
    assert_same_run(runs[0], runs[1], rtol=1e-5)


def test_the_same_run_gives_the_same_bits():
    first, second = run({"fused": "triton"}), run({"fused": "triton"})
    for a, b in zip(first[0].parameters(), second[0].parameters()):
        assert torch.equal(a, b)


def layers(n, dtype=torch.float32):
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(3 + i % 5, 4, dtype=dtype)) for i in range(n)]


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_three_launches_per_dtype_whatever_the_number_of_layers_and_groups(variant):
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
    assert counts[8] == counts[64] and len(counts[64]) == 3
    mixed = layers(4) + layers(4, torch.float64)
    optimizer = variant(mixed, fused="triton", lr=0.1)
    for p in mixed:
        p.grad = torch.randn_like(p)
    with counting_launches() as launches:
        optimizer.observe(torch.tensor(1.0))
        optimizer.step()
    assert len(launches) == 6  # two dtypes


@pytest.mark.parametrize("variant, bound", [(KOALAPlusPlus, 130), (KOALAV, 85), (KOALAM, 125)], ids=IDS)
def test_the_aten_ops_of_a_cuda_step_do_not_grow_with_the_layers_and_none_reads_the_device(variant, bound):
    """Counted on fake CUDA tensors (no GPU needed): a value read back to the host would fail there."""
    counted = {n: step_dispatches(lambda ps: variant(ps, fused=True, lr=0.1, weight_decay=1e-3), [(3, 4)] * n)
               for n in (8, 64)}
    assert counted[8].ops == counted[64].ops <= bound, counted[64].by_op
    assert counted[8].launches == counted[64].launches == 3
    assert "_local_scalar_dense" not in counted[64].by_op
