"""The fused steps' multi-tensor CPU kernels (``csrc/koala_cpu.cpp``: KOALA++, KOALA-V, KOALA-M), built on first use.

``torch.utils.cpp_extension`` compiles them once per machine (10-16 s; the
build is cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), for the vector instructions torch itself uses
on this CPU. Each pass of a step is then one call for every layer of a dtype,
like torch's fused CPU AdamW. Building needs a C++ compiler and ``ninja``
(``pip install ninja``), as ``torch.compile`` on CPU needs a compiler; where
the build fails, :func:`cpu_kernels` warns once, saying why, and returns
``None``: the fused step then runs the foreach path (koala_hf.optim.dispatch's
fallback rule: the same results, more calls per step).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from koala_hf.optim import layouts

SOURCE = Path(__file__).parent / "csrc" / "koala_cpu.cpp"
# torch's CPU capability -> the compiler flags that let ATen's vector types use it.
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
}

_KERNELS: object = None  # not tried yet; then the ops namespace, or False when the build failed


def cpu_kernels():
    """``torch.ops.koala_hf`` with the fused CPU ops, or ``None`` where they cannot be built here."""
    global _KERNELS
    if _KERNELS is None:
        try:
            _KERNELS = _build()
        except Exception as error:  # no compiler, no ninja, an unsupported platform: fall back, once
            _KERNELS = False
            lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
            reason = next((line for line in lines if "error:" in line), lines[0])  # the compiler's, if any
            warnings.warn(
                "fused=True could not build the multi-tensor CPU kernels of koala_hf "
                f"({type(error).__name__}: {reason}); fused=True runs the foreach path instead (same results, "
                "slower with many tensors). Building needs a C++ compiler and ninja (pip install ninja).",
                RuntimeWarning,
                stacklevel=3,
            )
    return _KERNELS or None


def _build():
    from torch.utils.cpp_extension import load

    if hasattr(torch.ops.koala_hf, "koala_m_sums"):
        return torch.ops.koala_hf  # loaded already (by another copy of this module)
    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-fopenmp", *ISA_FLAGS.get(capability, []), *layouts.cpp_defines()]
    # One build per source, layouts, torch version and instruction set (a home directory shared by different CPUs).
    digest = hashlib.sha256(SOURCE.read_bytes() + f"{torch.__version__} {flags}".encode()).hexdigest()[:12]
    with ninja_on_path():
        load(
            name=f"koala_hf_cpu_{capability.lower()}_{digest}",
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    return torch.ops.koala_hf


@contextlib.contextmanager
def ninja_on_path():
    """``torch.utils.cpp_extension`` runs ``ninja`` from ``PATH``; ``pip install ninja`` puts it beside this
    interpreter, which a virtual environment used without activating it leaves off ``PATH``: add it there
    for the build, when no ``ninja`` is on ``PATH`` already."""
    if shutil.which("ninja"):
        yield
        return
    previous = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), previous])
    try:
        yield
    finally:
        os.environ["PATH"] = previous
