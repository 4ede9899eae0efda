"""koala_hf.optim.dispatch: the one place a group's backend is chosen, and its one fallback rule."""

import warnings

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from koala_hf import KOALAM, KOALAV, KOALAPlusPlus
from koala_hf.optim import cpu_kernels as cpu_kernels_module
from koala_hf.optim import dispatch, triton_runtime
from koala_hf.optim.dispatch import Backend, check_options, choose_backend

CPU = [torch.zeros(3), torch.zeros(2, 2)]


def group(**options):
    return {"fused": None, "foreach": None, **options}


@pytest.fixture
def cuda_tensors():
    """Tensors that say they are on CUDA (fake: no GPU needed, the choice reads only the device)."""
    with FakeTensorMode():
        yield [torch.empty(3, device="cuda")]


def test_without_fused_foreach_decides_and_none_is_torchs_default():
    assert choose_backend(group(foreach=False), CPU, "K") is Backend.PER_TENSOR
    assert choose_backend(group(foreach=True), CPU, "K") is Backend.FOREACH
    assert choose_backend(group(), CPU, "K") is Backend.PER_TENSOR  # torch: foreach only on CUDA


def test_fused_is_the_devices_fused_backend_cpp_on_the_cpu_and_triton_on_cuda(cuda_tensors):
    assert cpu_kernels_module.cpu_kernels() is not None, "the CPU kernels must build where the tests run"
    assert choose_backend(group(fused=True), CPU, "K") is Backend.FUSED_CPU
    assert choose_backend(group(fused=True), cuda_tensors, "K") is Backend.TRITON
    assert not Backend.FOREACH.fused and Backend.FUSED_CPU.fused and Backend.TRITON.fused


def test_the_one_fallback_rule_a_fused_backend_that_cannot_run_here_runs_foreach_with_one_warning(monkeypatch, cuda_tensors):
    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_kernels_module, "_build", no_compiler)
    monkeypatch.setattr(cpu_kernels_module, "_KERNELS", None)
    with pytest.warns(RuntimeWarning, match="could not build.*pip install ninja"):
        assert choose_backend(group(fused=True), CPU, "K") is Backend.FOREACH
    monkeypatch.setattr(triton_runtime, "unavailable", lambda devices: "Triton is not installed (stand-in)")
    monkeypatch.setattr(dispatch, "_WARNED_TRITON", False)
    with pytest.warns(RuntimeWarning, match=r"K runs its Triton kernels \(fused=True\), and they cannot run here \(Triton is not installed"):
        assert choose_backend(group(fused=True), cuda_tensors, "K") is Backend.FOREACH
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once each
        assert choose_backend(group(fused=True), CPU, "K") is Backend.FOREACH
        assert choose_backend(group(fused=True), cuda_tensors, "K") is Backend.FOREACH


def test_by_default_cuda_runs_the_triton_kernels_and_elsewhere_no_fused_backend(cuda_tensors):
    assert choose_backend(group(), cuda_tensors, "K") is Backend.TRITON
    assert choose_backend(group(foreach=True), cuda_tensors, "K") is Backend.FOREACH  # asked for
    assert choose_backend(group(), CPU, "K") is Backend.PER_TENSOR
    for variant in (KOALAPlusPlus, KOALAV, KOALAM):
        assert variant([nn.Parameter(torch.zeros(2))]).param_groups[0]["fused"] is None


def test_by_default_on_cuda_without_triton_the_foreach_path_runs_said_once_with_the_cause(monkeypatch, cuda_tensors):
    monkeypatch.setattr(triton_runtime, "unavailable", lambda devices: "Triton is not installed (stand-in)")
    monkeypatch.setattr(dispatch, "_WARNED_TRITON", False)
    with pytest.warns(RuntimeWarning, match=r"KOALAV runs its Triton kernels by default on CUDA, and they cannot run "
                                            r"here \(Triton is not installed \(stand-in\)\); it runs the foreach path"):
        assert choose_backend(group(), cuda_tensors, "KOALAV") is Backend.FOREACH
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert choose_backend(group(), cuda_tensors, "KOALAV") is Backend.FOREACH


def test_fused_triton_asks_for_triton_and_on_the_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"fused='triton'\) cannot run here: .*TRITON_INTERPRET=1.*fused=True"):
        choose_backend(group(fused="triton"), CPU, "K")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend(group(fused="triton"), CPU, "K") is Backend.TRITON


def test_fused_on_devices_without_a_fused_backend_is_refused_naming_foreach():
    meta = [torch.zeros(3, device="meta")]
    with pytest.raises(RuntimeError, match=r"KOALAV\(fused=True\) runs C\+\+ kernels on the CPU and Triton kernels on CUDA.*meta.*foreach=True"):
        choose_backend(group(fused=True), meta, "KOALAV")
    with pytest.raises(RuntimeError, match="one device type.*separate groups"):
        choose_backend(group(fused=True), CPU + meta, "KOALAPlusPlus")


@pytest.mark.parametrize("options, message", [
    ({"fused": "yes"}, "fused must be None, True, False or 'triton', got 'yes'"),
    ({"fused": 1}, "fused must be None, True, False or 'triton', got 1"),
    ({"foreach": "no"}, "foreach must be None, True or False, got 'no'"),
    ({"fused": True, "foreach": True}, "alternatives; set one of them"),
    ({"fused": "triton", "foreach": True}, "alternatives; set one of them"),
])
def test_options_that_name_no_backend_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        check_options(group(**options), "K")


@pytest.mark.parametrize("variant", [KOALAPlusPlus, KOALAV, KOALAM])
def test_every_variant_checks_its_options_and_devices_at_construction(variant, monkeypatch):
    with pytest.raises(ValueError, match="fused must be None, True, False or 'triton'"):
        variant([nn.Parameter(torch.zeros(2))], fused="cpu")
    with pytest.raises(ValueError, match="alternatives"):
        variant([nn.Parameter(torch.zeros(2))], fused=True, foreach=True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        variant([nn.Parameter(torch.zeros(2))], fused="triton")
    with pytest.raises(RuntimeError, match="foreach=True"):
        variant([nn.Parameter(torch.zeros(2, device="meta"))], fused=True)
