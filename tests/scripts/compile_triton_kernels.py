"""Compile the Triton kernels ahead of time for CUDA targets, on a machine with or without a GPU.

Reads a JSON list of launches on standard input, each ``{"kernel", "arguments": {name: type}, "constants":
{name: value}}`` (a type as Triton writes it, ``"*fp32"``, ``"i64"``; a ``tl`` dtype constant as
``{"dtype": "bfloat16"}``), and compiles each for every ``--arch`` (``triton.compile`` on an ``ASTSource``, to
PTX and a cubin through ptxas). Prints one JSON line per compilation: kernel, arch, and ``error`` (``null``
when it compiled). Run with ``TRITON_INTERPRET=0``: the kernels must be built as compiled functions.
"""

import argparse
import inspect
import json
import sys
import traceback

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from koala_hf.optim import triton_kernels


def source(kernel, arguments: dict, constants: dict) -> ASTSource:
    """The kernel's ASTSource, for the two ways Triton has taken a signature: by name with the compile-time
    arguments typed ``constexpr`` (Triton >= 3.2), or by position without them (Triton 3.0 and 3.1)."""
    names = kernel.arg_names
    if "constexprs" in inspect.signature(ASTSource).parameters:
        signature = {name: arguments.get(name, "constexpr") for name in names}
        return ASTSource(kernel, signature, constexprs=constants)
    signature = {names.index(name): kind for name, kind in arguments.items()}
    return ASTSource(kernel, signature, constants={names.index(name): value for name, value in constants.items()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80: sm_80)")
    args = parser.parse_args()
    if triton_kernels.INTERPRETED:
        raise SystemExit("the kernels were built for Triton's interpreter: run with TRITON_INTERPRET=0")
    failed = 0
    for launch in json.load(sys.stdin):
        kernel = triton_kernels.LAUNCHED[launch["kernel"]]
        constants = {name: getattr(tl, value["dtype"]) if isinstance(value, dict) else value
                     for name, value in launch["constants"].items()}
        for arch in args.arch:
            error = None
            try:
                compiled = triton.compile(source(kernel, launch["arguments"], constants),
                                          target=GPUTarget("cuda", arch, 32))
                if not compiled.asm.get("cubin"):
                    error = "no cubin was produced"
            except Exception:  # noqa: BLE001 - every compiler error is reported, with its traceback
                error = traceback.format_exc(limit=-3)
            failed += error is not None
            print(json.dumps({"kernel": launch["kernel"], "arch": arch, "arguments": launch["arguments"],
                              "error": error}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
