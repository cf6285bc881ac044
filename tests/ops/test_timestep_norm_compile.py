"""The PyTorch TimestepNorm under torch.compile: equal to eager on CPU with fullgraph, and free of the long scans
that make Inductor emit split scans (PyTorch issue #180221 crashes on CUDA when one reads a broadcast input)."""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from megalodon.ops.timestep_norm import NormStats, timestep_norm_blocked

G, D = 4, 16


def inputs(length, block, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, length, D, generator=g) + 2).requires_grad_()
    initial = NormStats(torch.tensor([0, 7])[:batch], torch.randn(batch, G, generator=g, dtype=torch.float64),
                        torch.rand(batch, G, generator=g, dtype=torch.float64) + 0.5)
    prior = NormStats(torch.tensor(2), torch.zeros(G, dtype=torch.float64, requires_grad=True),
                      torch.ones(G, dtype=torch.float64, requires_grad=True))
    weight = (torch.randn(D, generator=g) * 0.1).requires_grad_()
    bias = torch.randn(D, generator=g).requires_grad_()
    reset = torch.zeros(batch, -(-length // block), dtype=torch.bool)
    reset[0, 1] = True
    return x, initial, prior, weight, bias, block, reset


def loss(x, initial, prior, weight, bias, block, reset):
    y, final = timestep_norm_blocked(x, initial, weight, bias, 1e-5, block, reset, prior)
    return (y * torch.linspace(-1, 1, y.shape[1])[:, None]).square().sum() + final.var.sum()


@pytest.mark.slow
def test_compiled_matches_eager_with_fullgraph():
    args = inputs(length=50, block=16)
    leaves = [args[0], args[2].mean, args[3], args[4]]
    eager = loss(*args)
    grads = torch.autograd.grad(eager, leaves)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)(*args)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)
    for got, want in zip(compiled_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_no_scan_longer_than_32_steps_forward_or_backward():
    scans = []

    def record(graph, example_inputs):
        for node in graph.graph.nodes:
            if node.op == "call_function" and "cumsum" in str(node.target):
                source, dim = node.args[0], node.args[1]
                scans.append(source.meta["val"].shape[dim])
        return make_boxed_func(graph.forward)

    args = inputs(length=700, block=256)
    torch._dynamo.reset()
    out = torch.compile(loss, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)(*args)
    out.backward()
    assert scans and max(scans) <= 32, scans
