"""OpaqueOp (ops/triton/__init__.py): the custom op where a graph is traced, the implementation itself in eager
mode, with the same autograd formula on both paths. A toy op stands in for the kernels (no Triton needed)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megalodon.ops.triton import OpaqueOp


def _scaled(x: torch.Tensor, factor: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x * factor and, non-differentiable, x's sign. Records the type of x: a kernel launch needs a real tensor."""
    implementation_inputs.append(type(x))
    return x * factor, torch.sign(x)


implementation_inputs = []


scaled = OpaqueOp("megalodon_test::scaled", _scaled)
scaled.register_fake(lambda x, factor=2.0: (torch.empty_like(x), torch.empty_like(x)))
backward_calls = []


def _setup_context(ctx, inputs, output):
    ctx.factor = inputs[1]  # the default filled in on both paths
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _sign):
    backward_calls.append(ctx.factor)
    return grad * ctx.factor, None


scaled.register_autograd(_backward, _setup_context)


class SeenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def test_eager_calls_run_the_implementation_with_the_ops_gradient():
    x = torch.randn(5, requires_grad=True)
    with SeenOps() as seen:
        out, sign = scaled(x)
    assert not any(name.startswith("megalodon_test::") for name in seen.names), seen.names  # not dispatched
    assert not sign.requires_grad
    backward_calls.clear()
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert backward_calls == [2.0]
    torch.testing.assert_close(grad, torch.full_like(x, 2.0))
    torch.testing.assert_close(scaled(x, 3.0)[0], x * 3)


def test_traced_graphs_hold_the_custom_op():
    """Under torch.compile the custom op is one node of the graph, with its registered gradient."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    x = torch.randn(5, requires_grad=True)
    out = torch.compile(lambda t: scaled(t)[0] * 1.0, backend=backend, fullgraph=True)(x)
    assert "megalodon_test.scaled" in graphs[0]
    backward_calls.clear()
    out.sum().backward()
    assert backward_calls == [2.0]
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_fake_tensors_take_the_custom_ops_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    implementation_inputs.clear()
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(3, 4))
        out, sign = scaled(x)
    assert out.shape == (3, 4) and type(out).__name__ == "FakeTensor"
    assert not implementation_inputs  # the fake ran, not the implementation
