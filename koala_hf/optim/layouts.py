"""Each variant's two passes as every backend sees them, declared once (:class:`PassLayout`).

A KOALA step reduces each layer's tensors to a row of sums, turns the rows into a row of coefficients, and
applies the coefficients elementwise (koala_hf.optim.group_step). Four backends run those passes: the
per-tensor and foreach paths (plain torch), the C++ kernels (csrc/koala_cpu.cpp) and the Triton kernels
(triton_kernels.py). They agree on three orders, each written only here:

* ``lists``: the per-layer tensors a pass reads, in the order every backend receives them (the parameter,
  its gradient, then the variant's state tensors by their ``optimizer.state`` keys);
* ``sums``: the columns of a layer's row of sums (the reduction's result);
* ``coefficients``: the columns of a layer's row of coefficients (the update's input);

and ``written`` names the lists the update writes. The Python passes index by name through the layout; the
Triton kernels take every position as a ``tl.constexpr`` argument (:meth:`PassLayout.triton_constants`); the C++
kernels are compiled with every position as a preprocessor constant (:func:`cpp_defines`: ``KPP_LIST_H_PREV``,
``KM_COEF_STEP_U`` ...). tests/optim/test_layouts.py permutes every order and checks that every backend follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = {"lists": "LIST", "sums": "SUM", "coefficients": "COEF"}


@dataclass(frozen=True)
class PassLayout:
    """One variant's tensor lists and columns (see the module docstring)."""

    prefix: str  # the C++ constants' prefix
    lists: tuple[str, ...]
    sums: tuple[str, ...]
    coefficients: tuple[str, ...]
    written: tuple[str, ...]

    def __post_init__(self) -> None:
        for kind in KINDS:
            names = getattr(self, kind)
            if len(set(names)) != len(names):
                raise ValueError(f"{self.prefix}: the {kind} {names} repeat a name")
        if not set(self.written) <= set(self.lists):
            raise ValueError(f"{self.prefix}: written lists {self.written} are not all among {self.lists}")

    def position(self, kind: str, name: str) -> int:
        """Where ``name`` is in ``kind`` (``"lists"``, ``"sums"`` or ``"coefficients"``)."""
        return getattr(self, kind).index(name)

    @property
    def written_positions(self) -> tuple[int, ...]:
        return tuple(self.lists.index(name) for name in self.written)

    def ordered(self, by_name: dict[str, list]) -> list:
        """The values of ``by_name`` (one per list name) in the layout's order of lists."""
        return [by_name[name] for name in self.lists]

    def stack(self, kind: str, columns: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[n, len(kind)]`` from one ``[n]`` column per name, in the layout's order of ``kind``."""
        names = getattr(self, kind)
        if set(columns) != set(names):
            raise ValueError(f"{self.prefix}: {kind} {sorted(columns)} are not {sorted(names)}")
        return torch.stack([columns[name] for name in names], dim=-1)

    def unstack(self, kind: str, table: torch.Tensor) -> dict[str, torch.Tensor]:
        """The columns of an ``[n, len(kind)]`` table (or one row), by name."""
        return dict(zip(getattr(self, kind), table.unbind(-1)))

    def triton_constants(self, *kinds: str) -> dict[str, int]:
        """Every position of ``kinds`` as a kernel's ``tl.constexpr`` arguments (``LIST_PARAM``, ``SUM_HH`` ...),
        and their numbers (``N_SUM``, ``N_COEF``; for the lists ``WIDTH``, the address table's width, one more:
        computed here, as Triton 3.0's compiler mistypes a constexpr sum passed on to another function)."""
        constants = {}
        for kind in kinds:
            names = getattr(self, kind)
            if kind == "lists":  # the address table's width: a column per list and the layer's size
                constants["WIDTH"] = len(names) + 1
            else:
                constants[f"N_{KINDS[kind]}"] = len(names)
            constants.update({f"{KINDS[kind]}_{name.upper()}": index for index, name in enumerate(names)})
        return constants


KOALA_PLUS_PLUS = PassLayout(
    prefix="KPP",
    lists=("param", "grad", "H_prev", "v"),
    sums=("hh", "h_hprev", "h_v", "theta_theta"),  # E11-E13, and E3's theta.theta
    coefficients=("c_v", "c_h", "c_hp", "step_v", "step_h", "keep_hp", "take_h"),  # E14, E16, E17
    written=("param", "H_prev", "v"),
)
KOALA_V = PassLayout(
    prefix="KV",
    lists=("param", "grad"),
    sums=("hh", "theta_theta"),  # E21
    coefficients=("step",),
    written=("param",),
)
KOALA_M = PassLayout(
    prefix="KM",
    lists=("param", "grad", "w_avg", "u"),
    sums=("hh", "theta_theta", "dd", "dh"),  # E33, and E30's distance d = w_avg - theta
    coefficients=("step_theta", "step_u", "keep_avg", "take_theta"),  # E33, E34
    written=("param", "w_avg", "u"),
)


def cpp_defines() -> list[str]:
    """The C++ kernels' compiler flags, from the layouts as they are now: ``-D{prefix}_{LIST|SUM|COEF}_{NAME}=``
    its position, ``-D{prefix}_N_{LIST|SUM|COEF}=`` their number and ``-D{prefix}_WRITTEN=`` the written lists
    as a bit mask (bit ``k``: list ``k``)."""
    flags = []
    for layout in (KOALA_PLUS_PLUS, KOALA_V, KOALA_M):
        for kind, tag in KINDS.items():
            names = getattr(layout, kind)
            flags += [f"-D{layout.prefix}_{tag}_{name.upper()}={index}" for index, name in enumerate(names)]
            flags.append(f"-D{layout.prefix}_N_{tag}={len(names)}")
        flags.append(f"-D{layout.prefix}_WRITTEN={sum(1 << k for k in layout.written_positions)}")
    return flags
