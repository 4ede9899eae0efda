"""Replay every pinned trajectory (tests/optim/pinned.py) with every order of koala_hf.optim.layouts reversed.

Each variant's tensor lists, columns of sums and columns of coefficients are reversed before any backend is
used; the C++ kernels are then built for the reversed layouts and the Triton kernels launched with them (under
``TRITON_INTERPRET=1``). Prints, as JSON, the largest relative difference of each case from its pin (the
Triton path's from the per-tensor pin). Run in its own process by tests/optim/test_layouts.py: C++ kernels built
for other layouts register the same op names, so one process can hold only one build::

    TRITON_INTERPRET=1 python -m tests.scripts.permuted_layouts
"""

from __future__ import annotations

import dataclasses
import json

import torch

from koala_hf.optim import layouts


def reversed_orders(layout: layouts.PassLayout) -> layouts.PassLayout:
    return dataclasses.replace(layout, lists=layout.lists[::-1], sums=layout.sums[::-1],
                               coefficients=layout.coefficients[::-1])


def main() -> None:
    for name in ("KOALA_PLUS_PLUS", "KOALA_V", "KOALA_M"):
        setattr(layouts, name, reversed_orders(getattr(layouts, name)))
    from koala_hf.optim import triton_runtime
    from tests.optim.pinned import GROUPS, HOST, PATHS, PIN, cases, trajectory

    triton_skipped = triton_runtime.unavailable({"cpu"})  # e.g. an old Triton's interpreter
    pins = torch.load(PIN, weights_only=True)
    worst = {}
    # The Triton path replays the per-tensor pins, the foreach path of a device (coefficients on the host) the
    # foreach-masked ones.
    replays = {"triton": "per-tensor", **{path: "foreach-masked" for path in HOST}}
    extra = [(name, path) for name in GROUPS for path in HOST] + ([] if triton_skipped else [(name, "triton") for name in GROUPS])
    for name, path in cases() + extra:
        PATHS["triton"] = {"fused": "triton"}  # after cases(), which lists the pinned paths
        pinned = pins[f"{name}/{replays.get(path, path)}"]
        replayed = trajectory(name, path)
        worst[f"{name}/{path}"] = max(
            ((replayed[key] - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()
            for key, expected in pinned.items() if expected.is_floating_point())
    print(json.dumps({"layouts": {layout.prefix: dataclasses.asdict(layout) for layout in
                                  (layouts.KOALA_PLUS_PLUS, layouts.KOALA_V, layouts.KOALA_M)},
                      "worst_relative_difference": worst, "triton_skipped": triton_skipped}))


if __name__ == "__main__":
    main()
