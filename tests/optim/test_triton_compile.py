"""Every Triton kernel compiles ahead of time for CUDA (sm_80 and sm_90), as a real step launches it, for every
storage dtype: Triton's frontend, its MLIR passes and ptxas need no GPU. The interpreter tests
(test_triton_kernels.py) check the numbers but cannot see what only the compiler refuses (the kernels once
annotated their compile-time arguments with a module-level string, which the interpreter accepted and every
GPU refused).

The launches are recorded from steps on fake CUDA tensors (koala_hf.optim.profiling.recording_launches, nothing
runs), so their argument types and constants are those a CUDA step passes; a subprocess with
``TRITON_INTERPRET=0`` builds the compiled kernels and compiles each (tests/scripts/compile_triton_kernels.py).
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from koala_hf import KOALAM, KOALAV, KOALAPlusPlus
from koala_hf.optim import triton_runtime
from koala_hf.optim.profiling import recording_launches

ROOT = Path(__file__).resolve().parents[2]
LAUNCHES = Path(__file__).with_name("triton_launches.json")  # written by: python -m tests.optim.test_triton_compile
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ARCHS = (80, 90)
pytestmark = pytest.mark.compiles_triton
KERNELS = ("koala_plus_plus_partials", "koala_v_partials", "koala_m_partials", "combine", "koala_plus_plus_coefficients",
           "koala_v_coefficients", "koala_m_coefficients", "koala_plus_plus_update", "koala_v_update", "koala_m_update")


def argument_type(value) -> str:
    """A launch argument's type as Triton's signature writes it (``"*fp32"``, ``"i64"``), by Triton's own rule."""
    from triton.runtime.jit import mangle_type

    return mangle_type(value)


def constant(value):
    return {"dtype": str(value).split(".")[-1].replace("fp", "float").replace("bf16", "bfloat16")} \
        if type(value).__name__ == "dtype" else value


def recorded_launches() -> list[dict]:
    """The launches of two steps of every variant (KOALA-M's first step differs), per storage dtype, deduplicated."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from koala_hf.optim.triton_runtime import triton_dtype

    assert constant(triton_dtype(torch.bfloat16)) == {"dtype": "bfloat16"}
    argument_names = _argument_names()
    unique = {}
    for dtype in DTYPES:
        for variant in (KOALAPlusPlus, KOALAV, KOALAM):
            with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True):
                warnings.simplefilter("ignore")  # fake tensors' data_ptr() reads as 0, with a deprecation warning
                params = [torch.nn.Parameter(torch.empty(shape, device="cuda", dtype=dtype)) for shape in ((3, 4), (70000,))]
                optimizer = variant(params, fused=True, lr=0.1, weight_decay=1e-3)
                with recording_launches(run=False) as launches:
                    for _ in range(2):
                        for p in params:
                            p.grad = torch.empty_like(p)
                        optimizer.observe(torch.ones((), device="cuda"))
                        optimizer.step()
            for launch in launches:
                names = argument_names[launch.kernel]
                record = {"kernel": launch.kernel,
                          "arguments": {name: argument_type(a) for name, a in zip(names, launch.arguments)},
                          "constants": {name: constant(v) for name, v in launch.constants.items()}}
                unique[json.dumps(record, sort_keys=True)] = record
    return list(unique.values())


def _argument_names() -> dict:
    """Each kernel's runtime arguments, in order, read from its source (the compile-time ones come by name)."""
    import inspect

    from koala_hf.optim.triton_runtime import kernels

    names = {}
    for name, kernel in kernels().LAUNCHED.items():
        fn = getattr(kernel, "fn", kernel)
        names[name] = [p.name for p in inspect.signature(fn).parameters.values() if "constexpr" not in str(p.annotation)]
    return names


def launches_here() -> list[dict]:
    """The launches recorded here; where this torch cannot step on fake CUDA tensors (torch 2.4's fake tensors
    initialise CUDA), those committed from the newest torch (LAUNCHES, which test_the_committed_launches_are_current
    keeps equal to the recorded ones)."""
    try:
        return recorded_launches()
    except RuntimeError as error:
        if "CUDA" not in str(error):
            raise
        return json.loads(LAUNCHES.read_text())


def test_the_committed_launches_are_those_a_step_records():
    try:
        recorded = recorded_launches()
    except RuntimeError as error:
        pytest.skip(f"this torch cannot step on fake CUDA tensors ({str(error).splitlines()[0]})")
    assert recorded == json.loads(LAUNCHES.read_text()), \
        "the kernels' launches changed: python -m tests.optim.test_triton_compile writes them again"


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    triton = pytest.importorskip("triton", reason="Triton is not installed (it comes with torch's Linux CUDA wheels)")
    if triton_runtime.too_old(triton.__version__):  # the runtime refuses it too, and falls back to foreach
        pytest.skip(triton_runtime.unavailable({"cuda"}))
    launches = launches_here()
    environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "tests/scripts/compile_triton_kernels.py", "--arch", *map(str, ARCHS)],
                          input=json.dumps(launches), capture_output=True, text=True, cwd=ROOT, env=environment,
                          timeout=900)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not results:
        pytest.fail(f"the compile script produced nothing:\n{done.stderr[-4000:]}")
    return results


def test_every_kernel_and_storage_dtype_is_launched_and_compiled(compiled):
    assert {r["kernel"] for r in compiled} == set(KERNELS)
    pointers = {r["arguments"]["table"] for r in compiled if "table" in r["arguments"]}
    assert pointers == {"*i64"}
    stored = {r["arguments"]["partials"] for r in compiled if "partials" in r["arguments"]}
    assert stored == {"*fp32", "*fp64"}  # the arithmetic dtype of the chunk sums
    assert {r["arch"] for r in compiled} == set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
@pytest.mark.parametrize("kernel", KERNELS)
def test_the_kernel_compiles_for_cuda(compiled, kernel, arch):
    mine = [r for r in compiled if r["kernel"] == kernel and r["arch"] == arch]
    assert mine
    failures = [f"{r['arguments']}:\n{r['error']}" for r in mine if r["error"]]
    assert not failures, "\n\n".join(failures)


if __name__ == "__main__":  # under TRITON_INTERPRET=1, as the tests run
    os.environ.setdefault("TRITON_INTERPRET", "1")
    LAUNCHES.write_text(json.dumps(recorded_launches(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {LAUNCHES}")
