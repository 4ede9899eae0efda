"""Whether and how the fused steps' Triton kernels run here; every launch goes through :func:`launch`.

Importing this module does not import Triton: :func:`kernels` imports the kernels (koala_hf.optim.triton_kernels)
on first use. On CUDA they are compiled; on the CPU they run through Triton's interpreter under
``TRITON_INTERPRET=1``, which Triton fixes when it is first imported (set it before Python starts).
"""

from __future__ import annotations

import functools
import os

import torch

CHUNK = 16384  # elements per program
BLOCK = 1024  # elements per vector operation inside a program
TL_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def interpreting() -> bool:
    """Whether Triton runs kernels through its interpreter (``TRITON_INTERPRET=1``: on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


OLDEST_TRITON = (3, 2)


def unavailable(devices: set[str]) -> str | None:
    """Why the Triton kernels cannot run on ``devices`` here, or ``None`` when they can."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"Triton is not installed ({error}); it comes with torch's Linux CUDA wheels"
    others = sorted(devices - {"cuda"})
    if others == ["cpu"] and not interpreting():
        return "on the CPU they run only through Triton's interpreter: set TRITON_INTERPRET=1 (slow; for tests)"
    if too_old(triton.__version__):
        return (f"Triton {triton.__version__}'s compiler gives these kernels' compile-time arguments the wrong values "
                f"(found compiling them ahead of time on Triton 3.0); Triton {'.'.join(map(str, OLDEST_TRITON))} or "
                "newer compiles them (it comes with torch 2.6 and later)")
    if interpreting() != _triton_imported_interpreting():
        return _MODE_CHANGED
    if others == ["cpu"] and not interpreter_runs():
        import triton

        return (f"Triton {triton.__version__}'s interpreter leaves CPU tensors unwritten (checked with one kernel); "
                "a newer Triton runs these kernels on the CPU")
    if others and others != ["cpu"]:
        return f"Triton kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1), and parameters are on {', '.join(others)}"
    return None


_MODE_CHANGED = ("TRITON_INTERPRET was changed after Triton was imported, and Triton fixes its mode at import: set it "
                 "in the environment before starting Python")


def too_old(version: str) -> bool:
    """Whether Triton ``version`` predates :data:`OLDEST_TRITON`, the oldest that compiles these kernels correctly."""
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) < OLDEST_TRITON


def launch(kernel, grid: tuple[int, ...], *args, **constants) -> None:
    """Every launch of a step goes through here (koala_hf.optim.profiling counts them)."""
    kernel[grid](*args, **constants)


def kernels():
    """The kernels module (koala_hf.optim.triton_kernels), imported on first use, in the mode Triton was imported in."""
    from koala_hf.optim import triton_kernels

    if triton_kernels.INTERPRETED != interpreting():
        raise RuntimeError(_MODE_CHANGED)
    return triton_kernels


def triton_dtype(dtype: torch.dtype):
    """The ``triton.language`` dtype of a torch floating dtype."""
    import triton.language as tl

    return getattr(tl, TL_DTYPES[dtype])


@functools.cache
def interpreter_runs() -> bool:
    """Whether Triton's interpreter runs a kernel on CPU tensors correctly here (Triton 3.0's writes nothing)."""
    source, target = torch.tensor([1.0, 2.0]), torch.zeros(2)
    kernels().probe[(1,)](source, target)
    return target.tolist() == [2.0, 3.0]


def _triton_imported_interpreting() -> bool:
    """The mode Triton's own library (``tl.sum`` ...) was built in when ``triton.language`` was imported."""
    import triton.language.standard as standard

    return type(standard.sum).__name__ == "InterpretedFunction"
