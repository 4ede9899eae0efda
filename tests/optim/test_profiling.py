"""koala_hf.optim.profiling: what a multi-tensor op counts as, checked on fake CUDA tensors against the rules of
torch's fast route (ATen's ForeachUtils.h)."""

import pytest
import torch

from koala_hf.optim.profiling import CountOps, multi_tensor_launches

aten = torch.ops.aten


@pytest.fixture
def fake_cuda():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        yield lambda *shape, dtype=torch.float32: torch.empty(shape, device="cuda", dtype=dtype)


def test_lists_of_equal_shapes_dtype_and_device_take_the_fast_route_one_launch(fake_cuda):
    xs = [fake_cuda(3, 4), fake_cuda(5), fake_cuda(2, 2, 2)]
    ys = [fake_cuda(3, 4), fake_cuda(5), fake_cuda(2, 2, 2)]
    assert multi_tensor_launches(aten._foreach_addcmul_.Tensor, (xs, ys, ys)) == 1
    assert multi_tensor_launches(aten._foreach_mul_.ScalarList, (xs, [0.5, 1.0, 2.0])) == 1
    assert multi_tensor_launches(aten._foreach_norm.Scalar, (xs, 2)) == 1


def test_per_layer_0d_coefficients_beside_full_tensors_take_the_slow_route_one_launch_per_tensor(fake_cuda):
    xs = [fake_cuda(3, 4), fake_cuda(5), fake_cuda(2, 2, 2)]
    coefficients = list(fake_cuda(3).unbind())
    assert multi_tensor_launches(aten._foreach_mul_.List, (xs, coefficients)) == 3
    assert multi_tensor_launches(aten._foreach_addcmul_.Tensor, (xs, xs, coefficients)) == 3


def test_mixed_dtypes_strides_or_non_dense_tensors_take_the_slow_route(fake_cuda):
    xs = [fake_cuda(3, 4), fake_cuda(4, 3)]
    assert multi_tensor_launches(aten._foreach_mul_.List, (xs, [fake_cuda(3, 4), fake_cuda(3, 4).t()])) == 2
    assert multi_tensor_launches(aten._foreach_norm.Scalar, ([fake_cuda(3, 4), fake_cuda(4, dtype=torch.float16)], 2)) == 2
    # Built with empty_strided, not by slicing: a strided slice of a fake CUDA tensor reaches the CUDA driver on
    # torch 2.4 (the floor), which a machine without a GPU refuses.
    non_dense = torch.empty_strided((3, 4), (8, 2), device="cuda")
    assert multi_tensor_launches(aten._foreach_norm.Scalar, ([non_dense, fake_cuda(4)], 2)) == 2
    assert multi_tensor_launches(aten._foreach_add_.List, (xs, [t.half() for t in xs])) == 2
    assert multi_tensor_launches(aten._foreach_copy_.default, (xs, [t.half() for t in xs])) == 1  # copy converts


def test_ops_off_cuda_count_once():
    xs = [torch.zeros(3), torch.zeros(4)]
    assert multi_tensor_launches(aten._foreach_mul_.List, (xs, list(torch.ones(2).unbind()))) == 1


def test_the_counter_counts_a_slow_route_op_as_its_launches(fake_cuda):
    xs = [fake_cuda(3, 4), fake_cuda(5)]
    with CountOps() as counter:
        torch._foreach_mul_(xs, list(fake_cuda(2).unbind()))
        torch._foreach_mul_(xs, 2.0)
    assert counter.ops["_foreach_mul_"] == 3


def test_a_copy_to_the_host_is_counted_once_and_arrives_as_distinct_numbers():
    from koala_hf.optim.profiling import step_dispatches

    read = []

    class ReadsBack:
        def __init__(self, params):
            self.params = params

        def step(self):
            flat = torch.cat([p.grad.reshape(-1) for p in self.params])
            read.append(flat.cpu().tolist())

    counted = step_dispatches(ReadsBack, [(2,), (3,)], koala=False)
    assert counted.host_copies == 1 and counted.by_op["_to_copy"] == 1 and "_local_scalar_dense" not in counted.by_op
    assert read[-1] == [1.0, 2.0, 3.0, 4.0, 5.0]  # every coefficient its own number: the general path's ops
    assert step_dispatches(lambda ps: torch.optim.SGD(ps, lr=0.1), [(2,)]).host_copies == 0
