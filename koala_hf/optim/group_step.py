"""One parameter group's share of a step, as a named record built in one place (:func:`gather`).

Every KOALA step runs the same way over these records: a reduction pass gives each layer's sums (``H.H``,
products with the state, ``theta.theta``), the sums of every group are completed over the shards in one
collective (:func:`complete_sums`), the variant's pure coefficient functions turn them into per-layer
coefficients, and an update pass applies them. The record's ``backend`` (koala_hf.optim.dispatch) says how
the passes run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from koala_hf.optim.dispatch import Backend, choose_backend
from koala_hf.optim.layers import measurement_jacobians
from koala_hf.optim.sharding import check_parameter, local, reduce_sums, sharding_group


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
    jacobians: list[torch.Tensor] | None = None  # ``H = g + wd theta`` (E3) on the eager paths; fused kernels form it
    sums: torch.Tensor | None = field(default=None, repr=False)  # ``[n_layers, k]``, whole layers' after complete_sums

    @property
    def weight_decay(self) -> float:
        return self.group["weight_decay"]

    def state_shards(self, key: str) -> list[torch.Tensor]:
        """The per-parameter state tensors ``key``, as this process's shards (they are sharded like their parameter)."""
        return [local(state[key]) for state in self.states]


def gather(optimizer, *, off_cpu: Backend | None) -> list[GroupStep]:
    """The groups with a parameter to step, their state created on first use (``optimizer._layer_state``).

    ``H`` is formed here for the eager backends, on the CPU's foreach path into the optimizer's reused workspace.
    """
    name = type(optimizer).__name__
    steps = []
    for index, group in enumerate(optimizer.param_groups):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        for p in params:
            check_parameter(p, name)  # parameters swapped in after construction (accelerate's FSDP2 preparation)
            if p.grad.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients")
            if torch.is_complex(p.grad):
                raise RuntimeError(f"{name} does not support complex gradients")
        states = [optimizer._layer_state(p) for p in params]  # an entry per parameter, as DCP expects
        shards, grads = [local(p) for p in params], [local(p.grad) for p in params]
        step = GroupStep(index, group, params, shards, grads, states, choose_backend(group, shards, name, off_cpu=off_cpu))
        if not step.backend.fused:
            foreach = step.backend is Backend.FOREACH
            workspace = optimizer._workspace("H").get(params, shards) if foreach and step.weight_decay else None
            step.jacobians = measurement_jacobians(shards, grads, step.weight_decay, foreach, out=workspace)
        steps.append(step)
    return steps


def complete_sums(steps: list[GroupStep], local_sums: list[torch.Tensor], ok: torch.Tensor, optimizer: str) -> torch.Tensor:
    """Store each group's whole-layer sums in ``step.sums``; return ``ok`` cleared when any sum is not finite.

    ``local_sums[i]`` are group ``i``'s ``[n_layers, k]`` sums over this process's elements. Under FSDP2 those of
    every group are stacked into **one** ``all_reduce`` over the sharding group (koala_hf.optim.sharding);
    otherwise they are the whole layers' sums already.
    """
    if not steps:
        return ok
    process_group = sharding_group([p for step in steps for p in step.params], optimizer)
    whole = local_sums
    if process_group is not None:
        whole = list(reduce_sums(torch.cat(local_sums), process_group).split([len(s) for s in local_sums]))
    for step, sums in zip(steps, whole):
        step.sums = sums
    return ok & torch.isfinite(torch.cat(whole)).all()
