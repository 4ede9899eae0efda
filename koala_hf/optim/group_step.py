"""One parameter group's share of a step, as a named record built in one place (:func:`gather`).

Every KOALA step runs the same way over these records: a reduction pass gives each layer's sums (``H.H``,
products with the state, ``theta.theta``), the sums of every group are completed over the shards in one
collective (:func:`complete_sums`), the variant's pure coefficient functions turn them into per-layer
coefficients, and an update pass applies them. The record's ``backend`` (koala_hf.optim.dispatch) says how
the passes run: a variant maps each backend to its passes, and :func:`reduce_by_backend` and
:func:`update_by_backend` call each backend's pass once with all the groups it runs (so that a multi-tensor
backend covers them in one launch). What a reduction prepares for its update (the eager backends' ``H``, the
Triton kernels' address tables) is its plan, returned with the sums (:class:`Prepared`) and handed to the
update; a pass reads its tensor lists and columns through the variant's koala_hf.optim.layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch

from koala_hf.optim import dispatch, host_coefficients
from koala_hf.optim.dispatch import Backend
from koala_hf.optim.gather_cache import Fingerprint, Taken, take
from koala_hf.optim.layers import measurement_jacobians
from koala_hf.optim.layouts import PassLayout
from koala_hf.optim.sharding import local_tensors, reduce_sums, sharding_group


@dataclass
class GroupStep:
    """One parameter group at one step."""

    index: int  # the group's position in ``param_groups``: its ``R_k`` is ``noise[index]``
    group: dict  # the parameter group; every hyperparameter is read from it
    params: list[torch.Tensor]  # the parameters stepped (grad not None): the keys of ``optimizer.state``
    shards: list[torch.Tensor]  # what this process updates: its FSDP2 shards, else the parameters themselves
    grads: list[torch.Tensor]  # the gradients, as shards
    states: list[dict]  # ``optimizer.state[p]`` of every parameter stepped
    backend: Backend
    sharded: bool  # the parameters are FSDP2's DTensors: the sums are completed over the sharding group
    fingerprint: Fingerprint | None  # what the record was built from (koala_hf.optim.gather_cache), if readable
    grad_addresses: list[int] | None  # with it: the group's gradients' addresses (0 where None), for the Triton tables

    @property
    def weight_decay(self) -> float:
        return self.group["weight_decay"]

    def state_shards(self, key: str) -> list[torch.Tensor]:
        """The per-parameter state tensors ``key``, as this process's shards (they are sharded like their parameter)."""
        return local_tensors([state[key] for state in self.states])

    def lists(self, layout: PassLayout) -> list[list[torch.Tensor]]:
        """The layout's tensor lists, in its order: ``param`` the shards, ``grad`` the gradients, a state key its
        tensors."""
        named = {"param": self.shards, "grad": self.grads}
        return [named[name] if name in named else self.state_shards(name) for name in layout.lists]

    def layers(self, layout: PassLayout) -> list[tuple[torch.Tensor, ...]]:
        """Each layer's tensors, in the layout's order of lists."""
        return list(zip(*self.lists(layout)))


def gather(optimizer) -> list[GroupStep]:
    """The groups with a parameter to step, their state created on first use (``optimizer._layer_state``): the
    last step's records with this step's gradients while the groups' fingerprints are unchanged
    (koala_hf.optim.gather_cache, ``optimizer._gathered``), else built anew."""
    found = optimizer._gathered.lookup(optimizer.param_groups, optimizer.state)
    if found is not None:
        return [replace(step, grads=_stepped(now.grads, now.fingerprint), grad_addresses=now.grad_addresses)
                for step, now in found if step is not None]
    name = type(optimizer).__name__
    steps, records, fingerprints = [], [], []
    for index, group in enumerate(optimizer.param_groups):
        taken = take(group)
        step = _group_step(optimizer, index, group, taken, name)
        records.append(step)
        fingerprints.append(taken.fingerprint if taken else None)
        if step is not None:
            steps.append(step)
    if all(fingerprints) and not any(step.sharded for step in steps):  # kept without the gradients (never held alive)
        records = [None if step is None else replace(step, grads=[], grad_addresses=None) for step in records]
        optimizer._gathered.keep(optimizer.param_groups, fingerprints, records, optimizer.state)
    else:
        optimizer._gathered.clear()
    return steps


def _stepped(grads: list, fingerprint: Fingerprint) -> list:
    """The gradients that are not ``None`` (all of them, in a training loop's usual step)."""
    return [g for g in grads if g is not None] if fingerprint.missing else grads


def _group_step(optimizer, index: int, group: dict, taken: Taken | None, name: str) -> GroupStep | None:
    """One group's record, checked, or ``None`` where no parameter of it has a gradient."""
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return None
    optimizer.check_new_parameters(params)  # parameters swapped in after construction (accelerate's FSDP2)
    for p in params:
        if p.grad.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients")
        if torch.is_complex(p.grad):
            raise RuntimeError(f"{name} does not support complex gradients")
    states = [optimizer._layer_state(p) for p in params]  # an entry per parameter, as DCP expects
    shards, grads = local_tensors(params), local_tensors([p.grad for p in params])
    sharded = any(s is not p for s, p in zip(shards, params))
    kept = taken if taken is not None and not sharded else None  # a DTensor's own address is not its shard's
    return GroupStep(index, group, params, shards, grads, states, dispatch.choose_backend(group, shards, name), sharded,
                     kept.fingerprint if kept else None, kept.grad_addresses if kept else None)


class CompletedSums(NamedTuple):
    """Each group's ``[n_layers, k]`` sums over its whole layers, and the step's ``ok`` cleared when one is not finite."""

    sums: list[torch.Tensor]
    ok: torch.Tensor


def complete_sums(steps: list[GroupStep], local_sums: list[torch.Tensor], ok: torch.Tensor, optimizer: str) -> CompletedSums:
    """Each group's whole-layer sums, and ``ok`` cleared when any sum is not finite.

    ``local_sums[i]`` are group ``i``'s ``[n_layers, k]`` sums over this process's elements. Under FSDP2 those of
    every group are stacked into **one** ``all_reduce`` over the sharding group (koala_hf.optim.sharding);
    otherwise they are the whole layers' sums already.
    """
    if not steps:
        return CompletedSums([], ok)
    sharded = any(step.sharded for step in steps)
    process_group = sharding_group([p for step in steps for p in step.params], optimizer) if sharded else None
    whole = local_sums
    if process_group is not None:
        whole = list(reduce_sums(torch.cat(local_sums), process_group).split([len(s) for s in local_sums]))
    return CompletedSums(whole, ok & torch.isfinite(torch.cat(whole)).all())


def _by_backend(steps: list[GroupStep]) -> dict[Backend, list[int]]:
    indices: dict[Backend, list[int]] = {}
    for i, step in enumerate(steps):
        indices.setdefault(step.backend, []).append(i)
    return indices


class Prepared(NamedTuple):
    """What a batching backend's reduction returns: its groups' sums, and what it prepared for its update (the
    Triton kernels' ``StepBatch``: address tables, copies, buckets), handed on explicitly."""

    sums: list[torch.Tensor]
    plan: object


class Reduction(NamedTuple):
    """A step's reduction: each group's local ``[n_layers, k]`` sums, and each batching backend's plan."""

    sums: list[torch.Tensor]
    plans: dict[Backend, object]


def reduce_by_backend(optimizer, steps: list[GroupStep], passes: dict[Backend, Callable], device, dtype) -> Reduction:
    """Each group's local sums in ``device`` and ``dtype``: ``passes[backend](optimizer, steps, device, dtype)``
    called once per backend with its groups, in order; a pass may return :class:`Prepared` with its plan."""
    sums: list = [None] * len(steps)
    plans: dict[Backend, object] = {}
    for backend, indices in _by_backend(steps).items():
        result = passes[backend](optimizer, [steps[i] for i in indices], device, dtype)
        if isinstance(result, Prepared):
            result, plans[backend] = result.sums, result.plan
        for i, group_sums in zip(indices, result):
            sums[i] = group_sums.to(device, dtype)
    return Reduction(sums, plans)


def update_by_backend(optimizer, steps: list[GroupStep], passes: dict[Backend, Callable], coefficients: list, ok,
                      plans: dict[Backend, object], *extra) -> None:
    """``passes[backend](optimizer, steps, coefficients, ok, plan, *extra)`` once per backend with its groups and
    theirs, ``plan`` what its reduction prepared (``None`` for a backend that prepares nothing)."""
    for backend, indices in _by_backend(steps).items():
        passes[backend](optimizer, [steps[i] for i in indices], [coefficients[i] for i in indices], ok,
                        plans.get(backend), *extra)


def group_by_group_sums(one_group: Callable) -> Callable:
    """A reduction written for one group, ``(optimizer, step, device, dtype) -> sums``, in the list form."""

    def every_group(optimizer, steps, device, dtype):
        return [one_group(optimizer, step, device, dtype) for step in steps]

    return every_group


def group_by_group_update(one_group: Callable) -> Callable:
    """An update written for one group, ``(optimizer, step, coefficients, ok, *extra)``, in the list form."""

    def every_group(optimizer, steps, coefficients, ok, plan, *extra):  # a C++ pass prepares no plan
        for step, group_coefficients in zip(steps, coefficients):
            one_group(optimizer, step, group_coefficients, ok, *extra)

    return every_group


def eager_reduction(one_group: Callable, foreach: bool) -> Callable:
    """The reduction of an eager backend: each group's ``H = g + wd theta`` (E3) formed one layer at a time, or
    with multi-tensor ops (``foreach``; on the CPU into the optimizer's reused workspace), then
    ``one_group(optimizer, step, jacobians, device, dtype, foreach) -> sums``; the formed ``H`` are the plan."""

    def reduction(optimizer, steps, device, dtype) -> Prepared:
        jacobians = []
        for step in steps:
            workspace = optimizer._workspace("H").get(step.params, step.shards) if foreach and step.weight_decay else None
            jacobians.append(measurement_jacobians(step.shards, step.grads, step.weight_decay, foreach, out=workspace))
        return Prepared([one_group(optimizer, step, h, device, dtype, foreach) for step, h in zip(steps, jacobians)],
                        jacobians)

    return reduction


def eager_update(one_group: Callable) -> Callable:
    """The update of an eager backend: ``one_group(optimizer, step, jacobians, coefficients, ok, *extra)`` with
    the ``H`` its reduction formed."""

    def every_group(optimizer, steps, coefficients, ok, jacobians, *extra):
        for step, h, group_coefficients in zip(steps, jacobians, coefficients):
            one_group(optimizer, step, h, group_coefficients, ok, *extra)

    return every_group


def foreach_update(on_device: Callable, on_host: Callable) -> Callable:
    """The foreach backend's update. On the CPU, ``on_device`` (an :func:`eager_update`) runs it, the
    coefficients as tensors. Off it, every group's coefficients and ``ok`` are read to the host in one copy
    (koala_hf.optim.host_coefficients), a step that is not ok is skipped, and
    ``on_host(optimizer, step, jacobians, numbers, *extra)`` applies each group's numbers as scalar lists."""

    def every_group(optimizer, steps, coefficients, ok, jacobians, *extra):
        if not host_coefficients.wanted(steps[0].shards if steps else []):
            return on_device(optimizer, steps, coefficients, ok, jacobians, *extra)
        host = host_coefficients.read(coefficients, ok)
        if host.ok:
            for step, h, numbers in zip(steps, jacobians, host.groups):
                on_host(optimizer, step, h, numbers, *extra)

    return every_group
