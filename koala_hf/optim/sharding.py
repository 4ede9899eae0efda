"""KOALA on FSDP2's sharded parameters, exactly (spec E11-E15, E21, E33 on whole layers).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter and its
gradient is a ``DTensor`` split along dim 0 over a 1-D mesh; ``to_local()`` is
this process's shard (no padding, possibly empty), and writing into it updates
the parameter. Every per-layer sum KOALA needs (``H.H``, ``H.H_prev``,
``H.v_prev``, ``theta.theta``, ``||H||^2``) is a sum over elements, so it is the
sum over the shards of the local sums: the optimizers compute the local sums of
all layers, stack them, and make **one** ``all_reduce`` per step over the
sharding group. The scalar algebra then runs identically on every process and
the elementwise updates touch only the local shards, where the state (``v``,
``H_prev``) lives too, sharded like its parameter.

Anything else that splits or flattens parameters (2-D meshes such as HSDP or
tensor parallelism, other placements, parameters left out of sharding next to
sharded ones, FSDP1's ``FlatParameter``) is refused with an error that says
what is supported.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

SUPPORTED = (
    "Supported: one process, DDP, and FSDP2 (fully_shard) with every trained parameter sharded on dim 0 over a "
    "1-D mesh."
)


@functools.cache
def _dtensor_types():
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor, Shard
    return DTensor, Shard


def is_dtensor(t: torch.Tensor) -> bool:
    types = _dtensor_types()
    return types is not None and isinstance(t, types[0])


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view: writing into it updates the DTensor), or ``t`` itself."""
    return local_tensors([t])[0]


def local_tensors(tensors) -> list[torch.Tensor]:
    """:func:`local` of each tensor, the DTensor type looked up once for the list (a step calls this for every
    layer's parameter, gradient and state: its host time)."""
    types = _dtensor_types()
    if types is None:
        return list(tensors)
    dtensor = types[0]
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def check_parameter(p: torch.Tensor, optimizer: str) -> None:
    """Raise ``ValueError`` for a parameter KOALA cannot step exactly: FSDP1's flat, or a DTensor not FSDP2's."""
    if type(p).__name__ == "FlatParameter":
        raise ValueError(
            f"{optimizer} got FSDP1's FlatParameter, which concatenates many tensors: KOALA's per-layer dot products "
            f"(E11-E15) would silently mix layers. Use FSDP2 (fully_shard; accelerate's fsdp_version: 2). {SUPPORTED}"
        )
    if not is_dtensor(p):
        return
    _, Shard = _dtensor_types()
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(
            f"{optimizer} got a parameter distributed as {tuple(p.placements)} over a {p.device_mesh.ndim}-D mesh "
            f"(HSDP, tensor parallelism or another placement), which it cannot step exactly. {SUPPORTED}"
        )


def sharding_group(params: list[torch.Tensor], optimizer: str):
    """The process group the per-layer sums must be reduced over: ``None`` for plain tensors, the FSDP2 mesh's
    group when the parameters are sharded. Mixed plain and sharded parameters, or several meshes, are refused."""
    types = _dtensor_types()
    sharded = [p for p in params if isinstance(p, types[0])] if types is not None else []
    if not sharded:
        return None
    if len(sharded) != len(params):
        raise ValueError(
            f"{optimizer} got parameters left out of FSDP2 sharding next to sharded ones; their gradients are not "
            f"averaged over the processes, so the step would differ between them. Shard every trained module "
            f"(fully_shard on the root too). {SUPPORTED}"
        )
    mesh = sharded[0].device_mesh
    if any(p.device_mesh != mesh for p in sharded):
        raise ValueError(f"{optimizer} got parameters sharded over different device meshes. {SUPPORTED}")
    return mesh.get_group()  # each parameter's placement was checked once (check_parameter, from the optimizer)


def reduce_sums(sums: torch.Tensor, group) -> torch.Tensor:
    """Sum the stacked local per-layer sums over the sharding group: the one collective of a sharded step."""
    if group is None:
        return sums
    sums = sums.contiguous()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return sums
