"""The ops gpu_tuning.py times, forward and backward, each as a training step of mega200M runs it (the decode's GEMM
into its output: forward, as a decode step runs it): a builder takes the shape and returns run(), which does one
forward and backward on tensors it made once (their gradients cleared after), so that it can be captured in a
CUDA graph and replayed."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from megalodon import MegalodonConfig


class Shape(NamedTuple):
    """What the ops are timed at: a preset's widths (mega200M's: the issue's), a length, a device."""

    config: MegalodonConfig
    length: int
    device: str


def cema_op(shape: Shape) -> Callable[[], None]:
    """The CEMA on the fp32 input the MEGA layer gives it."""
    from megalodon.layers.cema import CEMA

    cfg = shape.config
    torch.manual_seed(0)
    layer = CEMA(cfg.model_dim, cfg.cema_ndim).to(shape.device)
    x = torch.randn(1, shape.length, cfg.model_dim, device=shape.device, requires_grad=True)

    def run() -> None:
        y, _ = layer(x, None, cfg.chunk_size, None)
        y.backward(torch.ones_like(y))
        x.grad = None
        layer.zero_grad(set_to_none=True)

    return run


def norm_op(shape: Shape) -> Callable[[], None]:
    """The TimestepNorm on the fp32 residual stream, blocks of the chunk size, with the bf16 copy of its output
    made in the same pass (the MEGA layer's copy_dtype: fp32 for the CEMA, bf16 for the values' linear), backward
    through both."""
    from megalodon.layers.timestep_norm import TimestepNorm

    cfg = shape.config
    torch.manual_seed(0)
    norm = TimestepNorm(cfg.model_dim, cfg.norm_num_groups, cfg.norm_eps).to(shape.device)
    x = (torch.randn(1, shape.length, cfg.model_dim, device=shape.device) * 2 + 1).requires_grad_()
    dy = torch.randn(1, shape.length, cfg.model_dim, device=shape.device)
    dy_low = torch.randn(1, shape.length, cfg.model_dim, device=shape.device, dtype=torch.bfloat16)

    def run() -> None:
        y, y_low, _ = norm(x, None, cfg.chunk_size, copy_dtype=torch.bfloat16)
        torch.autograd.backward([y, y_low], [dy, dy_low])
        x.grad = None
        norm.zero_grad(set_to_none=True)

    return run


def attention_op(shape: Shape) -> Callable[[], None]:
    """The chunk attention (bf16, values through SiLU) as a graphed step runs it."""
    from megalodon.ops import attention

    cfg = shape.config
    heads, dz, dv = cfg.num_heads, cfg.head_z_dim, cfg.head_value_dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, shape.length, heads, d, device=shape.device, dtype=torch.bfloat16, requires_grad=True)
               for d in (dz, dz, dv))
    q.data.mul_(dz ** -0.5)
    grad = torch.ones(1, shape.length, heads, dv, device=shape.device, dtype=torch.bfloat16)

    def run() -> None:
        with attention.launches_without_host_cost():
            attention.chunked_attention(q, k, v, cfg.chunk_size, silu_values=True)[0].backward(grad)
        for t in (q, k, v):
            t.grad = None

    return run


def queries_keys_op(shape: Shape) -> Callable[[], None]:
    """q and k from z (bf16, as the linears give it): its per-head norm, affine and rotary, both ways."""
    from megalodon.ops.attention import queries_keys, rotary_angles

    cfg = shape.config
    heads, dz = cfg.num_heads, cfg.head_z_dim
    torch.manual_seed(0)
    z = torch.randn(1, shape.length, heads * dz, device=shape.device, dtype=torch.bfloat16, requires_grad=True)
    scale, shift = (torch.randn(2, heads * dz, device=shape.device, requires_grad=True) for _ in range(2))
    freqs = 10000.0 ** (-torch.arange(0, dz, 2, device=shape.device, dtype=torch.float32) / dz)
    rotation = rotary_angles(torch.arange(shape.length, device=shape.device) % cfg.chunk_size, freqs, torch.float32)
    grads = [torch.randn(1, shape.length, heads, dz, device=shape.device, dtype=torch.bfloat16) for _ in range(2)]

    def run() -> None:
        torch.autograd.backward(queries_keys(z, heads, cfg.norm_eps, scale, shift, rotation), grads)
        for t in (z, scale, shift):
            t.grad = None

    return run


def add_linear_op(shape: Shape, features: int) -> Callable[[], None]:
    """A decode step's GEMM into its output (ops/fused.py's add_linear_): one bf16 row of `features` added into the
    model's width, as the FFN's and the MEGA layer's output projections add into the residual stream."""
    from megalodon.ops.fused import add_linear_

    width = shape.config.model_dim
    torch.manual_seed(0)
    out = torch.zeros(1, width, device=shape.device, dtype=torch.bfloat16)
    x = torch.randn(1, features, device=shape.device, dtype=torch.bfloat16)
    weight = (torch.randn(width, features, device=shape.device) * features ** -0.5).to(torch.bfloat16)

    def run() -> None:
        with torch.no_grad():
            add_linear_(out, x, weight)

    return run


def decode_linears_op(shape: Shape) -> Callable[[], None]:
    """Both of a mega200M layer's decode GEMMs into its output (add_linear_op), in one run."""
    runs = [add_linear_op(shape, shape.config.ffn_hidden_dim), add_linear_op(shape, shape.config.value_dim)]

    def run() -> None:
        for one in runs:
            one()

    return run


def kernel_ops(shape: Shape) -> dict[str, Callable[[], list[Callable[[], None]]]]:
    """Each kernel that may be turned off, with a builder of the ops it runs in: the CEMA's and the TimestepNorm's
    (against their PyTorch paths; the CEMA's: chunked Toeplitz matmuls on cuBLAS and a scan over chunks,
    ops/cema.py's cema_chunked), the SiLU gates' and the row norms' (bench_fused.py's four ops), the attention's
    masked softmax (in the chunk attention), the queries' and keys' (their norm, affine and rotary) and the
    decode's GEMM into its output (its two shapes in a mega200M layer)."""
    import bench_fused  # beside this file

    def fused(kernel: str) -> Callable[[], list[Callable[[], None]]]:
        kernel_of = {"output gate": "silu_gate", "FFN SiLU": "silu_gate", "RMSNorm": "norm_rows",
                     "LayerNorm": "norm_rows"}
        return lambda: [run for label, run in bench_fused.cases(shape.config, shape.length, shape.device).items()
                        if kernel_of[label] == kernel]

    return {"cema": lambda: [cema_op(shape)], "timestep_norm": lambda: [norm_op(shape)],
            "silu_gate": fused("silu_gate"), "norm_rows": fused("norm_rows"),
            "causal_softmax": lambda: [attention_op(shape)], "queries_keys": lambda: [queries_keys_op(shape)],
            "add_linear": lambda: [decode_linears_op(shape)]}

