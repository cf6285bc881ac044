"""The chunk attention alone (ops/attention.py's chunked_attention), forward and forward + backward.

    python benchmarks/bench_attention.py                                  # CPU, the `small` training shape
    python benchmarks/bench_attention.py --device cuda --blocks 1 2 4 8   # mega200M's shape on a GPU

The shape is B,L,H,dz,dv and --chunk (default: mega200M at 4K tokens, bf16, the values through SiLU as the MEGA
layer has them). --blocks sweeps how many blocks of queries a chunk is cut into on CUDA (ops/attention.py's
QUERY_BLOCKS_MAX; n blocks skip (n - 1) / 2n of the products): each count runs as a CUDA-graph step would, where
the split is taken whatever the number of chunks (launches_without_host_cost). Prints a Markdown table:
milliseconds (median of --repeats after a warm-up), the GPU's own time (the kernels' sum, from torch.profiler:
the figure to choose by) and the peak memory above the inputs.
"""

from __future__ import annotations

import argparse

import torch
from op_timing import time_op  # beside this file

from megalodon.ops import attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default=None, help="B,L,H,dz,dv (default: mega200M at 4K on CUDA, else small)")
    parser.add_argument("--chunk", type=int, default=None, help="chunk size (default: mega200M's 2048, or 256)")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--blocks", nargs="+", type=int, default=None,
                        help="query blocks per chunk to try (CUDA only; default: the module's own)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    shape = args.shape or ("1,4096,1,256,2048" if cuda else "8,1024,2,32,256")
    batch, length, heads, dz, dv = (int(v) for v in shape.split(","))
    chunk = args.chunk or (2048 if cuda else 256)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)

    def tensor(dim: int) -> torch.Tensor:
        return torch.randn(batch, length, heads, dim, device=args.device, dtype=dtype, requires_grad=True)

    q, k, v = tensor(dz), tensor(dz), tensor(dv)
    q.data.mul_(dz ** -0.5)
    counts = args.blocks if cuda and args.blocks else [None]
    print(f"chunk attention B={batch} L={length} H={heads} dz={dz} dv={dv} chunk={chunk} {args.dtype} on "
          f"{args.device}, values through SiLU\n")
    print("| query blocks | forward ms | forward + backward ms | fwd+bwd GPU ms | fwd+bwd peak MiB |")
    print("|---|---|---|---|---|")
    default = attention.QUERY_BLOCKS_MAX
    for count in counts:
        attention.QUERY_BLOCKS_MAX = default if count is None else count

        def forward():
            with attention.launches_without_host_cost():
                return attention.chunked_attention(q, k, v, chunk, silu_values=True)[0]

        def both():
            forward().backward(torch.ones(batch, length, heads, dv, device=args.device, dtype=dtype))

        with torch.no_grad():
            fwd = time_op(forward, args.repeats, cuda)
        full = time_op(both, args.repeats, cuda)
        blocks = len(attention.split_queries(chunk)) if cuda else 1
        gpu = "-" if full["gpu_ms"] is None else f"{full['gpu_ms']:.3f}"
        peak = "-" if full["peak_mib"] is None else f"{full['peak_mib']:.0f}"
        print(f"| {blocks} | {fwd['ms']:.2f} | {full['ms']:.2f} | {gpu} | {peak} |")
    attention.QUERY_BLOCKS_MAX = default


if __name__ == "__main__":
    main()
