"""The fused steps on the CPU (``fused=True``): one multi-tensor C++ call per pass (koala_hf.optim.cpu_kernels),
against the per-tensor paths; where the kernels cannot be built, the foreach path. (The Triton kernels:
test_triton_kernels.py.)"""

import warnings

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from koala_hf import KOALAM, KOALAV, KOALAPlusPlus
from koala_hf.optim import cpu_kernels as cpu_kernels_module

STEPS = 6


class MixedNetwork(nn.Module):
    """Parameters of every kind the kernels must handle: a channels_last 4-D weight, a transposed (dense,
    non-contiguous) matrix, a strided view whose gradient is laid out differently (copied and written back),
    vectors, a one-element tensor, float64 and bfloat16 layers beside the float32 ones."""

    def __init__(self, wide_dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Parameter(torch.randn(6, 3, 3, 3).to(memory_format=torch.channels_last))
        self.transposed = nn.Parameter(torch.randn(5, 27).t())
        self.strided = nn.Parameter(torch.randn(5, 10)[:, ::2])
        self.bias = nn.Parameter(torch.randn(5))
        self.scale = nn.Parameter(torch.randn(1))
        self.wide = nn.Parameter(torch.randn(40000, dtype=wide_dtype))  # more than one block of the kernels
        self.low = nn.Parameter(torch.randn(7, 4, dtype=torch.bfloat16))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.tanh(torch.nn.functional.conv2d(x, self.conv)).flatten(1)  # [batch, 6]
        h = torch.tanh(x.flatten(1) @ self.transposed)  # [batch, 5]
        h = torch.tanh(h @ self.strided + self.bias) * self.scale + features[:, :5]  # [batch, 5]
        extra = (self.wide.float()[:5] * h).sum(1) + (self.low.float().sum(0)[:1] * h[:, :1]).sum(1)
        return ((extra - 1.0) ** 2).mean() + 1e-3 * (self.wide.float() ** 2).sum() / self.wide.numel()


def batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 3, 3, generator=generator) for _ in range(STEPS)]


def train(model: MixedNetwork, optimizer: KOALAPlusPlus, inputs, nan_at: int | None = None) -> list[float]:
    losses = []
    for step, x in enumerate(inputs):
        optimizer.zero_grad()
        loss = model.loss(x)
        loss.backward()
        if step == nan_at:
            model.bias.grad[0] = float("nan")
        optimizer.observe(loss.detach())
        optimizer.step()
        losses.append(loss.item())
    return losses


STATE_KEYS = {KOALAPlusPlus: ("v", "H_prev", "filter"), KOALAV: (), KOALAM: ("u", "w_avg")}


def run(path: dict, nan_at: int | None = None, variant=KOALAPlusPlus, wide_dtype=torch.float64):
    model = MixedNetwork(wide_dtype)
    assert model.conv.is_contiguous(memory_format=torch.channels_last) and not model.transposed.is_contiguous()
    second = {"symmetric": False, "lr": 0.1} if variant is KOALAPlusPlus else {"lr": 0.05}  # KOALA++ (NS)
    groups = [
        {"params": [model.conv, model.transposed, model.strided, model.wide], "weight_decay": 1e-2},
        {"params": [model.bias, model.scale, model.low], **second},
    ]
    optimizer = variant(groups, lr=0.3 if variant is KOALAPlusPlus else 0.1, **path)
    losses = train(model, optimizer, batches(), nan_at)
    return model, optimizer, losses


def assert_same_run(fused, per_tensor, rtol):
    (model_f, opt_f, losses_f), (model_p, opt_p, losses_p) = fused, per_tensor
    assert losses_f == pytest.approx(losses_p, rel=rtol)
    for (name, p_f), p_p in zip(model_f.named_parameters(), model_p.parameters()):
        tolerance = 2e-2 if p_f.dtype == torch.bfloat16 else rtol
        assert p_f.dtype == p_p.dtype and p_f.stride() == p_p.stride(), name
        torch.testing.assert_close(p_f, p_p, rtol=tolerance, atol=tolerance * p_p.abs().max().item(), msg=name)
        for key in STATE_KEYS[type(opt_f)]:
            expected = opt_p.state[p_p][key]
            torch.testing.assert_close(opt_f.state[p_f][key], expected, rtol=tolerance,
                                       atol=tolerance * expected.abs().max().item(), msg=f"{name} {key}")
    assert int(opt_f.state["koala"]["skipped_steps"]) == int(opt_p.state["koala"]["skipped_steps"])


@pytest.mark.parametrize("variant", [KOALAV, KOALAM], ids=["koala-v", "koala-m"])
@pytest.mark.parametrize("nan_at", [None, 3], ids=["", "non-finite-step"])
def test_koala_v_and_m_fused_match_their_per_tensor_paths(variant, nan_at):
    fused = run({"fused": True}, nan_at, variant)
    assert_same_run(fused, run({"foreach": False}, nan_at, variant), rtol=1e-5)
    assert int(fused[1].state["koala"]["skipped_steps"]) == (0 if nan_at is None else 1)


@pytest.mark.parametrize("variant", [KOALAPlusPlus, KOALAV, KOALAM], ids=["koala++", "koala-v", "koala-m"])
def test_fused_refuses_parameters_on_a_device_it_has_no_kernels_for_naming_what_to_use(variant):
    with pytest.raises(RuntimeError, match="C\\+\\+ kernels on the CPU and Triton kernels on CUDA.*meta.*foreach=True"):
        variant([nn.Parameter(torch.zeros(3, device="meta"))], fused=True)
    optimizer = variant([nn.Parameter(torch.zeros(3))], fused=True)
    moved = nn.Parameter(torch.zeros(3, device="meta"))  # swapped in after construction, as accelerate does
    moved.grad = torch.zeros(3, device="meta")
    optimizer.param_groups[0]["params"] = [moved]
    optimizer.observe(1.0)
    with pytest.raises(RuntimeError, match="C\\+\\+ kernels on the CPU and Triton kernels on CUDA.*meta.*foreach=True"):
        optimizer.step()


def test_the_multi_tensor_cpu_step_matches_the_per_tensor_path_on_mixed_layouts_and_dtypes():
    assert cpu_kernels_module.cpu_kernels() is not None, "the CPU kernels must build where the tests run"
    assert_same_run(run({"fused": True}), run({"foreach": False}), rtol=1e-5)


def test_a_non_finite_gradient_skips_the_whole_step_in_the_fused_path():
    fused = run({"fused": True}, nan_at=3)
    assert int(fused[1].state["koala"]["skipped_steps"]) == 1
    assert_same_run(fused, run({"foreach": False}, nan_at=3), rtol=1e-5)


def test_the_cpu_kernels_give_the_same_bits_on_one_thread_and_on_several():
    kernels = cpu_kernels_module.cpu_kernels()
    generator = torch.Generator().manual_seed(0)
    sizes = [100_000, 7, 50_000, 1]  # several blocks each for the large ones
    layers = [[torch.randn(n, generator=generator) for _ in range(4)] for n in sizes]
    coefficients = torch.rand(len(sizes), 7, generator=generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            p, g, v, hp = ([t.clone() for t in column] for column in zip(*layers))
            products = kernels.koala_plus_plus_products(p, g, hp, v, 1e-2)
            kernels.koala_plus_plus_update(p, g, v, hp, coefficients, torch.tensor(True), 1e-2)
            results.append([products, *p, *v, *hp])
    finally:
        torch.set_num_threads(threads)
    for one, several in zip(*results):
        assert torch.equal(one, several)


def direct_ops(optimizer, loss) -> list[str]:
    """Names of the ops ``step()`` calls directly (the profiler's children of ``Optimizer.step``)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        optimizer.observe(loss)
        optimizer.step()
    events = prof.events()
    steps = {id(e) for e in events if e.name.startswith("Optimizer.step#")}
    return sorted(e.name for e in events if e.cpu_parent is not None and id(e.cpu_parent) in steps)


@pytest.mark.parametrize("variant, kernels", [
    (KOALAPlusPlus, ("koala_plus_plus_products", "koala_plus_plus_update")),
    (KOALAV, ("koala_v_sums", "koala_v_update")),
    (KOALAM, ("koala_m_sums", "koala_m_update")),
], ids=["koala++", "koala-v", "koala-m"])
def test_the_calls_per_step_do_not_grow_with_the_number_of_layers(variant, kernels):
    calls = {}
    for layers in (4, 64):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(3 + i, 5)) for i in range(layers)]
        optimizer = variant(params, fused=True, lr=0.1)
        for step in range(3):  # KOALA-M's first step differs (E30's first distance)
            for p in params:
                p.grad = torch.randn_like(p)
            calls[layers] = direct_ops(optimizer, torch.tensor(1.0 + step))
    assert calls[4] == calls[64]
    for kernel in kernels:
        assert calls[64].count(f"koala_hf::{kernel}") == 1


def test_lr_scheduler_steps_trigger_no_recompilation():
    """The learning rate reaches the kernels inside the coefficient tensor, never as a compile-time constant:
    the CPU kernels compile nothing at a step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 1))
    optimizer = KOALAPlusPlus(model.parameters(), fused=True, lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def step():
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.observe(loss.detach())
        optimizer.step()

    step()
    compiled, recompiles = counters["stats"]["unique_graphs"], dict(counters["recompiles"])
    assert compiled == 0
    rates = []
    for _ in range(3):
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
        step()
    assert len(set(rates)) == 3
    assert counters["stats"]["unique_graphs"] == compiled
    assert dict(counters["recompiles"]) == recompiles


def test_a_failed_build_warns_once_and_falls_back_to_the_foreach_path(monkeypatch):
    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_kernels_module, "_build", no_compiler)
    monkeypatch.setattr(cpu_kernels_module, "_KERNELS", None)
    with pytest.warns(RuntimeWarning, match="pip install ninja"):
        fused = run({"fused": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernels_module.cpu_kernels() is None  # not tried again, not warned again
    assert_same_run(fused, run({"foreach": False}), rtol=1e-5)


@pytest.mark.parametrize("weight_decay, buffers", [(0.0, 0), (1e-2, 3)])
def test_the_cpu_foreach_workspace_holds_h_only_when_weight_decay_makes_one_and_is_never_saved(weight_decay, buffers):
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2, 2))]
    optimizer = KOALAPlusPlus(params, foreach=True, weight_decay=weight_decay)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.observe(torch.tensor(1.0))
    optimizer.step()
    assert len(optimizer._workspace("H")._buffers) == buffers
    assert "_workspaces" not in optimizer.__getstate__()
    assert all(set(state) - {"koala"} == {"v", "H_prev", "filter"} for key, state in optimizer.state_dict()["state"].items())


def test_the_build_finds_pips_ninja_beside_the_interpreter_when_path_lacks_one(monkeypatch, tmp_path):
    import shutil
    import sys
    from pathlib import Path

    if not (Path(sys.executable).parent / "ninja").exists():
        pytest.skip("ninja is not installed in this environment (the test extra installs it)")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("ninja") is None
    with cpu_kernels_module.ninja_on_path():
        assert Path(shutil.which("ninja")).parent == Path(sys.executable).parent
    assert shutil.which("ninja") is None
