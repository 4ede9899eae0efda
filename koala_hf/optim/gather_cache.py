"""The last step's per-group records, reused while the parameters they were built from are unchanged.

Building a step's records (koala_hf.optim.group_step.gather) takes Python per parameter: checks, state
lookups, the backend's choice. On a GPU that is host time the kernels wait for. Between two steps of a
training loop none of it changes: the gradients are new tensors (``zero_grad(set_to_none=True)`` frees
them, backward allocates them again), but of the same parameters. So a step takes each group's
:class:`Fingerprint` (the parameters' identities and addresses, which gradients are ``None``, read in C
loops: a few tenths of a microsecond per parameter) and reuses the records with the new gradients when it
matches the last one; anything else (a parameter added or swapped, ``p.data`` replaced, a gradient set to
``None`` or appearing, another ``fused``/``foreach`` option, a group added, an entry of the optimizer's
state removed, a state dict loaded: :meth:`GatherCache.clear`) rebuilds them. A state entry replaced in
place by hand (``optimizer.state[p] = {...}``) is not seen: load a state dict instead. The gradients'
addresses are read with the fingerprint, for the Triton kernels' address tables
(koala_hf.optim.triton_step.BatchCache), which follow them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

_ADDRESS = torch.Tensor.data_ptr
_GRAD = operator.attrgetter("grad")


@dataclass(frozen=True)
class Fingerprint:
    """What one parameter group's record was built from. Two are equal when the same parameters (by identity:
    ``params``, not compared, keeps them alive, so that an id is not reused) sit at the same addresses, with
    gradients at the same positions, under the same backend options."""

    options: tuple  # the group's (fused, foreach)
    ids: list[int]
    parameters: list[int]  # data_ptr of each parameter
    missing: tuple[int, ...]  # the positions whose gradient is None
    params: tuple = field(compare=False, repr=False)


class Taken(NamedTuple):
    """A group's fingerprint now, its gradients (``grads[i]`` is ``group["params"][i].grad``) and their
    addresses (0 where ``None``)."""

    fingerprint: Fingerprint
    grads: list
    grad_addresses: list[int]


def take(group: dict) -> Taken | None:
    """``group``'s fingerprint and its gradients, or ``None`` where a tensor has no address to read (sparse
    gradients, DTensors, other tensor subclasses): such a group is gathered anew at every step."""
    params = group["params"]
    grads = list(map(_GRAD, params))
    try:
        addresses = list(map(_ADDRESS, params))
        try:
            grad_addresses, missing = list(map(_ADDRESS, grads)), ()
        except TypeError:  # a gradient is None
            grad_addresses = [0 if g is None else g.data_ptr() for g in grads]
            missing = tuple(i for i, g in enumerate(grads) if g is None)
    except Exception:  # noqa: BLE001 - no storage ("Cannot access data pointer"), or a tensor subclass's refusal
        return None
    options = (group["fused"], group["foreach"])
    return Taken(Fingerprint(options, list(map(id, params)), addresses, missing, tuple(params)), grads, grad_addresses)


class GatherCache:
    """Each group's fingerprint and record (``None`` for a group with nothing to step) of the last step."""

    def __init__(self) -> None:
        self._kept: list[tuple[dict, Fingerprint, object]] | None = None
        self._state: tuple[object, int] | None = None  # the optimizer's state mapping, and its size, when kept

    def clear(self) -> None:
        self._kept = self._state = None

    def keep(self, groups: list[dict], fingerprints: list[Fingerprint], records: list, state: dict) -> None:
        self._kept = list(zip(groups, fingerprints, records))
        self._state = (state, len(state))

    def lookup(self, groups: list[dict], state: dict) -> list[tuple[object, Taken]] | None:
        """Each group's kept record and what was taken of it now, if every group's fingerprint matches the kept one
        and the optimizer's state is the same mapping with as many entries (an entry removed, or the state
        emptied, rebuilds the records: they hold the state of each parameter)."""
        kept = self._kept
        if kept is None or len(kept) != len(groups) or self._state[0] is not state or self._state[1] != len(state):
            return None
        found = []
        for group, (kept_group, fingerprint, record) in zip(groups, kept):
            if group is not kept_group:
                return None
            taken = take(group)
            if taken is None or taken.fingerprint != fingerprint:
                return None
            found.append((record, taken))
        return found
