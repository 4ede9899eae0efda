"""The promises every torch optimizer keeps (torch's own optimizer test suite), for every variant and path.

State-dict round trips and older state dicts, weights-only saving, hooks, copying and pickling, parameter
groups added later, frozen and unused parameters, memory layouts, tensor learning rates, mixed dtypes;
and the measurement guards: another variant's state, negative losses, finite diagnostics.
"""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from koala_hf import KOALAM, KOALAV, OPTIMIZERS, KOALAPlusPlus, create_optimizer
from koala_hf.optim.checkpoint import saved_filter_state
from tests.helpers import flat_parameters, per_sample_losses, regression_batches, tiny_network, train_step
from tests.reference import KoalaMReference, KoalaPlusPlusReference, KoalaVReference, add_layers, measurement

PATHS = [(name, {"foreach": foreach}) for name in OPTIMIZERS for foreach in (False, True)]
PATHS += [(name, {"fused": fused}) for name in ("koala++", "koala++ns", "koala-v", "koala-m") for fused in (True, "triton")]
IDS = [f"{n}-{next(iter(p))}={next(iter(p.values()))}" for n, p in PATHS]
LR = {"koala++": 0.3, "koala++ns": 0.3, "koala-v": 0.1, "koala-m": 0.3}


def build(name, path, params, **kwargs):
    return create_optimizer(name, params, lr=LR[name], weight_decay=1e-3, **path, **kwargs)


def run(model, optimizer, batches):
    for x, y in batches:
        train_step(model, optimizer, x, y)
    return flat_parameters(model)


def saved_and_reloaded(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def continued_equally(name, path, transform):
    """Train 3 steps, pass the state dict through ``transform`` into a fresh optimizer, train 3 more on both."""
    batches = regression_batches(6)
    model = tiny_network()
    optimizer = build(name, path, model.parameters())
    run(model, optimizer, batches[:3])
    twin = copy.deepcopy(model)
    fresh = build(name, path, twin.parameters())
    fresh.load_state_dict(transform(optimizer.state_dict()))
    assert torch.equal(run(model, optimizer, batches[3:]), run(twin, fresh, batches[3:]))
    return fresh


@pytest.mark.parametrize("name, path", PATHS, ids=IDS)
def test_a_weights_only_saved_state_dict_continues_identically(name, path):
    continued_equally(name, path, saved_and_reloaded)


@pytest.mark.parametrize("name, path", PATHS, ids=IDS)
def test_a_state_dict_from_before_a_hyperparameter_existed_loads_with_its_default(name, path):
    def older(state_dict):
        state_dict = copy.deepcopy(state_dict)
        for group in state_dict["param_groups"]:
            for key in ("foreach", "fused", "noise"):
                group.pop(key, None)
        saved_filter_state(state_dict["state"], state_dict["param_groups"]).pop("negative_loss_steps")
        return state_dict

    fresh = continued_equally(name, path, older)
    assert all(group["noise"] == "second_moment" for group in fresh.param_groups)
    assert all(group["foreach"] == path.get("foreach") for group in fresh.param_groups)


@pytest.mark.parametrize("name, path", PATHS, ids=IDS)
def test_every_state_key_is_a_parameter_and_the_older_layouts_still_load(name, path):
    """The filter-wide state travels in the first parameter's state, as LBFGS's does (torch.distributed.checkpoint
    maps every state key to a parameter; the groups hold only hyperparameters); the state dicts of the two older
    layouts, with it in the first group or under ``state["koala"]``, load and continue."""
    model = tiny_network()
    optimizer = build(name, path, model.parameters())
    run(model, optimizer, regression_batches(2))
    state_dict = optimizer.state_dict()
    first = state_dict["param_groups"][0]["params"][0]
    assert all(isinstance(key, int) for key in state_dict["state"]) and "koala" in state_dict["state"][first]
    assert not any("koala" in group for group in state_dict["param_groups"] + optimizer.param_groups)

    def in_the_first_group(state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["koala"] = state_dict["state"][first].pop("koala")
        return state_dict

    def under_its_own_key(state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"]["koala"] = state_dict["state"][first].pop("koala")
        return state_dict

    continued_equally(name, path, in_the_first_group)
    continued_equally(name, path, under_its_own_key)


@pytest.mark.parametrize("name, path", PATHS, ids=IDS)
def test_a_groups_representation_does_not_depend_on_its_position(name, path):
    """torch's test_state_dict_deterministic: a repeated group packs like the original (pytorch#36831)."""
    model = tiny_network()
    optimizer = build(name, path, model.parameters())
    run(model, optimizer, regression_batches(2))
    twin = build(name, path, copy.deepcopy(model).parameters())
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    twin.param_groups.extend(twin.param_groups)
    assert_equal_nested(optimizer.state_dict()["param_groups"][-1], twin.state_dict()["param_groups"][-1])


def assert_equal_nested(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_nested(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("name, path", PATHS, ids=IDS)
def test_step_counters_handed_back_as_python_numbers_load(name, path):
    def as_numbers(state_dict):
        state_dict = copy.deepcopy(state_dict)
        koala = saved_filter_state(state_dict["state"], state_dict["param_groups"])
        for key in ("step", "skipped_steps", "negative_loss_steps"):
            koala[key] = int(koala[key].item())
        koala["R"] = koala["R"].tolist()
        return state_dict

    fresh = continued_equally(name, path, as_numbers)
    assert fresh.state["koala"]["step"].item() == 6 and fresh.state["koala"]["step"].dtype == torch.int64


@pytest.mark.parametrize("name, path", PATHS, ids=IDS)
def test_what_a_load_state_dict_pre_hook_returns_is_what_is_loaded(name, path):
    model = tiny_network()
    optimizer = build(name, path, model.parameters())
    run(model, optimizer, regression_batches(2))
    state_dict = optimizer.state_dict()
    fresh = build(name, path, copy.deepcopy(model).parameters())

    def rewrite(opt, incoming):
        incoming = copy.deepcopy(incoming)
        filter_state = saved_filter_state(incoming["state"], incoming["param_groups"])
        filter_state["R"] = torch.full_like(filter_state["R"], 7.0)
        for per_parameter in incoming["state"].values():
            for key, value in per_parameter.items():
                if key != "koala":
                    per_parameter[key] = torch.full_like(value, 0.25)
        return incoming

    fresh.register_load_state_dict_pre_hook(rewrite)
    posts = []
    fresh.register_load_state_dict_post_hook(lambda opt: posts.append(opt))
    fresh.load_state_dict(state_dict)
    assert fresh.state["koala"]["R"].eq(7.0).all() and posts == [fresh]
    for p in fresh.param_groups[0]["params"]:
        for key, value in fresh.state[p].items():
            assert value.eq(0.25).all(), key
    assert optimizer.state["koala"]["R"].ne(7.0).all()  # the caller's dict is untouched


@pytest.mark.parametrize("name, path", PATHS, ids=IDS)
def test_state_dict_hooks_and_step_hooks_are_called(name, path):
    model = tiny_network()
    optimizer = build(name, path, model.parameters())
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("save-pre"))
    optimizer.register_state_dict_post_hook(lambda opt, sd: calls.append("save-post"))
    train_step(model, optimizer, *regression_batches(1)[0])
    optimizer.state_dict()
    assert calls == ["pre", "post", "save-pre", "save-post"]


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name, path", PATHS, ids=IDS)
def test_a_copied_model_and_optimizer_keep_stepping_like_the_original(name, path, copier):
    batches = regression_batches(5)
    model = tiny_network()
    optimizer = build(name, path, model.parameters())
    run(model, optimizer, batches[:2])
    # A pending measurement travels with the copy.
    optimizer.zero_grad()
    losses = per_sample_losses(model, *batches[2])
    losses.mean().backward()
    optimizer.observe(losses.mean(), losses)
    pair = {"model": model, "optimizer": optimizer}
    copied = copy.deepcopy(pair) if copier == "deepcopy" else pickle.loads(pickle.dumps(pair))
    for original, twin in zip(model.parameters(), copied["model"].parameters()):
        twin.grad = original.grad.clone()  # torch copies parameters without their .grad
    for which in (pair, copied):
        which["optimizer"].step()
        run(which["model"], which["optimizer"], batches[3:])
    assert torch.equal(flat_parameters(copied["model"]), flat_parameters(model))


@pytest.mark.parametrize("foreach", [False, True])
def test_koala_m_keeps_its_train_eval_mode_through_copies(foreach):
    for steps in (0, 2):
        model = tiny_network()
        optimizer = KOALAM(model.parameters(), foreach=foreach)
        run(model, optimizer, regression_batches(steps))
        optimizer.eval()
        for copied in (copy.deepcopy({"m": model, "o": optimizer})["o"], pickle.loads(pickle.dumps(optimizer))):
            with pytest.raises(RuntimeError, match="eval mode"):
                copied.observe(torch.tensor(1.0, dtype=torch.float64))
                copied.step()


def reference_for(name, optimizer, model, count):
    """The spec's straight-line implementation (tests/reference.py) over the model's first ``count`` parameters,
    with the optimizer's hyperparameters."""
    layers = [{"theta": p.data.view(-1), **{k: v for k, v in optimizer.param_groups[0].items() if k != "params"}}
              for p in list(model.parameters())[:count]]
    group = optimizer.param_groups[0]
    if name in ("koala++", "koala++ns"):
        return KoalaPlusPlusReference(layers, symmetric=group["symmetric"])
    if name == "koala-v":
        return KoalaVReference(layers, sigma=group["sigma"], q=group["q"])
    reference = KoalaMReference(layers, **{k: group[k] for k in ("sw", "sc", "sv", "a", "qw", "qv")})
    reference.predict()  # the papers' loop predicts before every forward pass
    return reference


def reference_step(name, reference, model, x, y):
    losses = per_sample_losses(model, x, y)
    grads = torch.autograd.grad(losses.mean(), list(model.parameters()))[: len(reference.layers)]
    step = reference.update if name == "koala-m" else reference.step
    step([g.reshape(-1) for g in grads], *measurement(losses.detach()))
    if name == "koala-m":
        reference.predict()


@pytest.mark.parametrize("name, path", PATHS, ids=IDS)
def test_a_parameter_group_added_after_steps_follows_the_spec_from_r_0(name, path):
    """The late group's layers start from E10 (KOALA-M: u = w_avg = 0) and its noise estimate from R_0 = 1."""
    model = tiny_network()
    twin = copy.deepcopy(model)
    params = list(model.parameters())
    optimizer = build(name, path, params[:4])
    reference = reference_for(name, optimizer, twin, 4)
    for index, (x, y) in enumerate(regression_batches(5)):
        if index == 2:
            optimizer.add_param_group({"params": params[4:]})
            late = [{"theta": p.data.view(-1), **{k: v for k, v in optimizer.param_groups[1].items() if k != "params"}}
                    for p in list(twin.parameters())[4:]]
            add_layers(reference, late)
        train_step(model, optimizer, x, y)
        reference_step(name, reference, twin, x, y)
    expected = flat_parameters(twin)
    assert ((flat_parameters(model) - expected).abs().max() / expected.abs().max()).item() < 1e-10
    assert not torch.equal(flat_parameters(model), flat_parameters(tiny_network()))


@pytest.mark.parametrize("name, path", PATHS, ids=IDS)
def test_a_parameter_whose_grad_is_none_is_not_touched_nor_its_state(name, path):
    """torch's contract (and the spec under E31 for KOALA-M): grad None skips the parameter altogether."""
    model = tiny_network()
    optimizer = build(name, path, model.parameters())
    run(model, optimizer, regression_batches(3))
    frozen = list(model.parameters())[1]
    frozen.requires_grad_(False)  # frozen mid-training: its grad becomes None
    optimizer.zero_grad()
    value = frozen.detach().clone()
    state = copy.deepcopy(optimizer.state[frozen])
    run(model, optimizer, regression_batches(3, seed=7))
    assert frozen.grad is None and torch.equal(frozen.detach(), value)
    for key, tensor in state.items():
        assert torch.equal(optimizer.state[frozen][key], tensor), key


@pytest.mark.parametrize("name, path", PATHS, ids=IDS)
def test_requires_grad_false_parameters_and_zero_gradients_stay_put(name, path):
    model = tiny_network()
    extra = nn.Parameter(torch.randn(3, dtype=torch.float64), requires_grad=False)
    optimizer = build(name, path, list(model.parameters()) + [extra])
    before = extra.detach().clone()
    bias = list(model.parameters())[-1]
    for x, y in regression_batches(3):
        optimizer.zero_grad()
        losses = per_sample_losses(model, x, y)
        losses.mean().backward()
        bias.grad.zero_()
        optimizer.observe(losses.mean(), losses)
        optimizer.step()
    assert torch.equal(extra.detach(), before)
    assert torch.isfinite(flat_parameters(model)).all()
    assert all(torch.isfinite(torch.tensor(v)) for v in optimizer.diagnostics().values())


class ConvNet(nn.Module):
    def __init__(self, memory_format=torch.contiguous_format):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1).double().to(memory_format=memory_format)
        self.head = nn.Linear(4, 1).double()

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("name, path", PATHS, ids=IDS)
def test_channels_last_and_non_contiguous_parameters_step_like_their_contiguous_twins(name, path):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, 3, 6, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(4, 8, 1, generator=generator, dtype=torch.float64)
    runs = []
    for layout in ("contiguous", "strided"):
        model = ConvNet(torch.channels_last if layout == "strided" else torch.contiguous_format)
        if layout == "strided":  # a transposed (non-contiguous) Linear weight
            model.head.weight = nn.Parameter(model.head.weight.detach().t().contiguous().t())
            assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
            assert not model.conv.weight.is_contiguous()
        optimizer = build(name, path, model.parameters())
        for xb, yb in zip(x, y):
            optimizer.zero_grad()
            losses = ((model(xb) - yb) ** 2).squeeze(-1)
            losses.mean().backward()
            optimizer.observe(losses.mean(), losses)
            optimizer.step()
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name, path", PATHS, ids=IDS)
def test_a_tensor_learning_rate_steps_like_the_same_float_one_under_a_scheduler(name, path):
    runs = []
    for lr in (torch.tensor(LR[name], dtype=torch.float64), LR[name]):
        model = tiny_network()
        optimizer = create_optimizer(name, model.parameters(), lr=lr, **path)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        for x, y in regression_batches(3):
            train_step(model, optimizer, x, y)
            scheduler.step()
        runs.append(flat_parameters(model))
    assert isinstance(optimizer.param_groups[0]["lr"], float) and optimizer.param_groups[0]["lr"] == pytest.approx(LR[name] / 8)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-14, atol=0)
    assert not torch.equal(runs[0], flat_parameters(tiny_network()))


def mixed_dtype_run(name, path):
    """A bfloat16 first layer and float32 others in one optimizer, three steps."""
    model = tiny_network(torch.float32)
    model[0].to(torch.bfloat16)
    optimizer = create_optimizer(name, model.parameters(), lr=LR[name], **path)
    for x, y in regression_batches(3, dtype=torch.float32):
        optimizer.zero_grad()
        out = model[1:](model[0](x.bfloat16()).float())
        losses = ((out - y) ** 2).squeeze(-1)
        losses.mean().backward()
        optimizer.observe(losses.mean(), losses)
        optimizer.step()
    assert model[0].weight.dtype == torch.bfloat16 and model[2].weight.dtype == torch.float32
    assert optimizer.state["koala"]["step"].item() == 3
    return model


@pytest.mark.parametrize("name, path", PATHS, ids=IDS)
def test_mixed_dtypes_in_one_optimizer_step_like_another_path(name, path):
    """Each path against another (per-tensor against foreach): the dtype buckets' rows land on their layers."""
    other = {"foreach": True} if path == {"foreach": False} else {"foreach": False}
    model, twin = mixed_dtype_run(name, path), mixed_dtype_run(name, other)
    for (key, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.dtype == torch.bfloat16:  # one bfloat16 rounding of H apart at most (the fused paths form it in float32)
            torch.testing.assert_close(p.float(), q.float(), rtol=2**-7, atol=2**-7 * q.float().abs().max().item(), msg=key)
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(model[0].weight, tiny_network(torch.float32)[0].weight.bfloat16())


VARIANTS = {"KOALAPlusPlus": KOALAPlusPlus, "KOALAV": KOALAV, "KOALAM": KOALAM}


@pytest.mark.parametrize("saved", list(VARIANTS))
@pytest.mark.parametrize("loading", list(VARIANTS))
def test_another_variants_state_is_refused_naming_both(saved, loading):
    model = tiny_network()
    source = VARIANTS[saved](model.parameters(), lr=0.1)
    target = VARIANTS[loading](model.parameters(), lr=0.1)
    for steps in (0, 1):  # before any step only the hyperparameters tell
        if steps:
            train_step(model, source, *regression_batches(1)[0])
        if saved == loading:
            target.load_state_dict(source.state_dict())
            continue
        with pytest.raises(ValueError, match=rf"saved by {saved}; it cannot be loaded into {loading}"):
            target.load_state_dict(source.state_dict())


def test_another_optimizers_state_is_refused():
    model = tiny_network()
    adamw = torch.optim.AdamW(model.parameters())
    train_step_plain = lambda: (per_sample_losses(model, *regression_batches(1)[0]).mean().backward(), adamw.step())  # noqa: E731
    train_step_plain()
    with pytest.raises(ValueError, match=r"saved by another optimizer \(state exp_avg, exp_avg_sq, step\)"):
        KOALAPlusPlus(model.parameters()).load_state_dict(adamw.state_dict())


@pytest.mark.parametrize("name, path", PATHS, ids=IDS)
def test_a_negative_loss_is_skipped_and_counted_with_one_warning(name, path):
    """E1 measures against a target of 0: a loss that can go negative must not make KOALA climb."""
    target = torch.tensor([1.0, -2.0], dtype=torch.float64)
    w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = build(name, path, [w])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            optimizer.zero_grad()
            loss = ((w - target) ** 2).sum() - 10.0  # negative near the optimum
            loss.backward()
            optimizer.observe(loss)
            optimizer.step()
    negative = [w for w in caught if "negative loss" in str(w.message)]
    assert len(negative) == 1
    assert torch.equal(w.detach(), torch.zeros(2, dtype=torch.float64))
    state = optimizer.state["koala"]
    assert state["negative_loss_steps"].item() == 3 and state["skipped_steps"].item() == 3
    assert optimizer.diagnostics()["koala/negative_loss_steps"] == 3.0


def test_a_negative_loss_on_the_device_warns_when_the_signals_are_read(monkeypatch):
    w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = KOALAPlusPlus([w])
    optimizer._warned_negative_loss = True  # as if observe() could not look (a CUDA loss)
    (w.sum() - 1.0).backward()
    optimizer.observe(torch.tensor(-1.0, dtype=torch.float64))
    optimizer.step()
    optimizer._warned_negative_loss = False
    with pytest.warns(UserWarning, match="negative loss"):
        optimizer.diagnostics()


def test_diagnostics_stay_finite_when_a_layer_has_no_gradient_signal():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", num_classes=3, pretrained=False)
    optimizer = KOALAPlusPlus(model.parameters(), lr=1.0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        optimizer.zero_grad()
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        optimizer.observe(losses.mean(), losses)
        optimizer.step()
        # timm zero-initialises each block's last norm: at the first step its conv has an all-zero gradient.
        signals = optimizer.diagnostics()
        assert all(torch.isfinite(torch.tensor(v)) for v in signals.values()), signals
        assert signals["koala/effective_step"] > 0


@pytest.mark.parametrize("path", [{"foreach": False}, {"foreach": True}, {"fused": True}], ids=["per-tensor", "foreach", "fused"])
def test_a_koala_v_state_dict_with_the_retired_per_layer_information_loads_and_continues(path):
    """Before 0.3 KOALA-V kept each layer's last ||H||^2 / s, which nothing read; such a state dict loads, without it."""
    def with_information(state_dict):
        state_dict = copy.deepcopy(state_dict)
        for group in state_dict["param_groups"]:
            for index in group["params"]:
                state_dict["state"].setdefault(index, {})["information"] = torch.tensor(0.5)
        return state_dict

    fresh = continued_equally("koala-v", path, with_information)
    assert not any("information" in fresh.state[p] for g in fresh.param_groups for p in g["params"])
