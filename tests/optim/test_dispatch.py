"""koala_hf.optim.dispatch: the one place a group's backend is chosen, and its one fallback rule."""

import warnings

import pytest
import torch
from torch import nn

from koala_hf import KOALAM, KOALAV, KOALAPlusPlus
from koala_hf.optim import cpu_kernels as cpu_kernels_module
from koala_hf.optim.dispatch import Backend, check_options, choose_backend

CPU = [torch.zeros(3), torch.zeros(2, 2)]


def group(**options):
    return {"fused": False, "foreach": None, **options}


def test_without_fused_foreach_decides_and_none_is_torchs_default():
    assert choose_backend(group(foreach=False), CPU, "K", off_cpu=None) is Backend.PER_TENSOR
    assert choose_backend(group(foreach=True), CPU, "K", off_cpu=None) is Backend.FOREACH
    assert choose_backend(group(), CPU, "K", off_cpu=None) is Backend.PER_TENSOR  # torch: foreach only on CUDA


def test_fused_on_the_cpu_is_the_cpp_kernels():
    assert cpu_kernels_module.cpu_kernels() is not None, "the CPU kernels must build where the tests run"
    assert choose_backend(group(fused=True), CPU, "K", off_cpu=None) is Backend.FUSED_CPU
    assert not Backend.FOREACH.fused and Backend.FUSED_CPU.fused and Backend.COMPILED.fused


def test_the_one_fallback_rule_a_fused_backend_that_cannot_be_built_runs_foreach_with_one_warning(monkeypatch):
    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_kernels_module, "_build", no_compiler)
    monkeypatch.setattr(cpu_kernels_module, "_KERNELS", None)
    with pytest.warns(RuntimeWarning, match="could not build.*pip install ninja"):
        assert choose_backend(group(fused=True), CPU, "K", off_cpu=None) is Backend.FOREACH
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_backend(group(fused=True), CPU, "K", off_cpu=Backend.COMPILED) is Backend.FOREACH


def test_fused_off_the_cpu_is_the_variants_backend_there_or_refused_naming_foreach():
    meta = [torch.zeros(3, device="meta")]
    assert choose_backend(group(fused=True), meta, "KOALAPlusPlus", off_cpu=Backend.COMPILED) is Backend.COMPILED
    with pytest.raises(RuntimeError, match=r"KOALAV\(fused=True\) has CPU kernels only.*meta.*foreach=True"):
        choose_backend(group(fused=True), meta, "KOALAV", off_cpu=None)
    with pytest.raises(RuntimeError, match="one device type.*separate groups"):
        choose_backend(group(fused=True), CPU + meta, "KOALAPlusPlus", off_cpu=Backend.COMPILED)


@pytest.mark.parametrize("options, message", [
    ({"fused": "yes"}, "fused must be True or False, got 'yes'"),
    ({"fused": 1}, "fused must be True or False, got 1"),
    ({"foreach": "no"}, "foreach must be None, True or False, got 'no'"),
    ({"fused": True, "foreach": True}, "alternatives; set one of them"),
])
def test_options_that_name_no_backend_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        check_options(group(**options), "K")


@pytest.mark.parametrize("variant", [KOALAPlusPlus, KOALAV, KOALAM])
def test_every_variant_checks_its_options_at_construction(variant):
    with pytest.raises(ValueError, match="fused must be True or False"):
        variant([nn.Parameter(torch.zeros(2))], fused="cpu")
    with pytest.raises(ValueError, match="alternatives"):
        variant([nn.Parameter(torch.zeros(2))], fused=True, foreach=True)
