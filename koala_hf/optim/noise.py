"""The measurement-noise variance ``R_k`` of every parameter group (spec E1a-E1c, E2)."""

from __future__ import annotations

import torch


def noise_estimates(groups: list[dict], previous: torch.Tensor, second_moment: torch.Tensor,
                    loss: torch.Tensor) -> torch.Tensor:
    """``R_k`` per group: its fixed ``r``, or ``alpha_r R_{k-1} + (1 - alpha_r) m_k`` (E2).

    ``m_k`` by the group's ``noise`` mode: ``second_moment`` ``mean(l_i^2)`` (E1a), ``variance``
    ``mean(l_i^2) - L_k^2`` over the step's whole sample set (E1b; 0 without per-sample losses), or ``none``,
    0 (E1c). ``previous`` holds ``R_{k-1}`` per group; nothing is read back to the host.
    """
    measurements = {}  # m_k of each mode the groups use, computed once
    estimates = []
    for index, group in enumerate(groups):
        if group["r"] is not None:
            estimates.append(torch.full_like(second_moment, group["r"]))
            continue
        mode = group["noise"]
        if mode not in measurements:
            measurements[mode] = _measurement(mode, second_moment, loss)
        alpha = group["alpha_r"]
        estimates.append(alpha * previous[index] + (1.0 - alpha) * measurements[mode])
    return torch.stack(estimates)


def _measurement(mode: str, second_moment: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    if mode == "second_moment":
        return second_moment  # E1a
    if mode == "variance":
        return torch.clamp(second_moment - loss * loss, min=0.0)  # E1b
    return torch.zeros_like(second_moment)  # E1c
