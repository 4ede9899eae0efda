"""koala_hf.optim.sharding in one process: what is accepted and refused, and the sums' reduction.
(Two-process FSDP2 runs: tests/optim/test_fsdp2.py.)"""

import pytest
import torch
import torch.distributed as dist

from koala_hf.optim.sharding import check_parameter, is_dtensor, local, reduce_sums, sharding_group

try:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import Replicate, Shard, distribute_tensor


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def dtensor(mesh, placement):
    return distribute_tensor(torch.arange(6.0).reshape(3, 2), mesh, [{"shard": Shard(0), "replicate": Replicate()}[placement]])


def test_plain_tensors_are_their_own_shard_and_need_no_reduction():
    t = torch.randn(3)
    assert not is_dtensor(t) and local(t) is t
    assert sharding_group([t], "K") is None
    sums = torch.randn(4, 2)
    assert reduce_sums(sums, None) is sums
    check_parameter(t, "K")


def test_fsdp1s_flat_parameter_is_refused_naming_fsdp2():
    class FlatParameter(torch.nn.Parameter):
        pass

    with pytest.raises(ValueError, match="FlatParameter.*mix layers.*FSDP2"):
        check_parameter(FlatParameter(torch.zeros(2)), "KOALAPlusPlus")


def test_a_dim_0_sharded_dtensor_is_stepped_through_its_local_shard(mesh):
    p = dtensor(mesh, "shard")
    assert is_dtensor(p) and torch.equal(local(p), torch.arange(6.0).reshape(3, 2))
    check_parameter(p, "K")
    group = sharding_group([p], "K")
    assert group is not None
    sums = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(reduce_sums(sums, group), sums)  # one process: the sum over one shard


def test_other_placements_and_mixed_parameters_are_refused_saying_what_is_supported(mesh):
    with pytest.raises(ValueError, match=r"distributed as \(Replicate\(\),\).*Supported: one process, DDP, and FSDP2"):
        check_parameter(dtensor(mesh, "replicate"), "K")
    with pytest.raises(ValueError, match="left out of FSDP2 sharding.*Supported"):
        sharding_group([dtensor(mesh, "shard"), torch.zeros(2)], "K")


@pytest.mark.parametrize("variant", ["koala++", "koala-v", "koala-m"])
def test_each_parameter_is_checked_once_also_one_swapped_in_after_construction(variant, monkeypatch):
    """check_parameter runs at add_param_group and, for a parameter swapped in since (accelerate's FSDP2
    preparation replaces parameters by their shards), at its first step; not again at every step."""
    from koala_hf import create_optimizer
    from koala_hf.optim import base

    checked = []
    monkeypatch.setattr(base, "check_parameter", lambda p, name: checked.append(p))
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    optimizer = create_optimizer(variant, params, lr=0.1)
    assert len(checked) == 2
    swapped = torch.nn.Parameter(torch.randn(2))
    optimizer.param_groups[0]["params"][1] = swapped
    for _ in range(3):
        for p in optimizer.param_groups[0]["params"]:
            p.grad = torch.randn_like(p)
        optimizer.observe(torch.tensor(1.0))
        optimizer.step()
    assert [id(p) for p in checked] == [id(params[0]), id(params[1]), id(swapped)]
