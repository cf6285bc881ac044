"""The TimestepNorm alone, forward + backward, at a layer's shape: the Triton kernels at each scan tiling asked
for, and the PyTorch path.

    python benchmarks/bench_timestep_norm.py --device cuda                       # mega200M's norm, L = 4096
    python benchmarks/bench_timestep_norm.py --device cuda --scan-tiles 256,8,4,32 1024,2,4,32 256,8,4,8

The scans over time (`scan_fwd_kernel`, `scan_bwd_kernel`) run a row's segments of tiles in parallel and carry
the state between them in sequence (`carry_fwd_kernel`, `carry_bwd_kernel`), with G / groups programs per
segment; --scan-tiles sets ops/triton/timestep_norm.py's SCAN_TOKENS, SCAN_GROUPS, SCAN_WARPS and, if given,
SCAN_SEGMENTS (tokens per tile at most, groups per program, warps, segments a row) for each row of the table.
Prints milliseconds (median of --repeats after a warm-up), the GPU's own time (the kernels' sum from
torch.profiler; the wall clock of a lone op is mostly the host's), and each tiling's largest difference from the
first one's output and input gradient. On a CPU only the PyTorch path runs.
"""

from __future__ import annotations

import argparse
import os

import torch
from op_timing import time_op  # beside this file

from megalodon.layers.timestep_norm import TimestepNorm
from megalodon.ops.triton import DISABLE_ENV


def measure(norm: TimestepNorm, x: torch.Tensor, dy: torch.Tensor, block: int, repeats: int) -> dict:
    outputs = {}

    def run() -> None:
        x.grad = None
        outputs["y"], _ = norm(x, None, block)
        outputs["y"].backward(dy)

    result = time_op(run, repeats, x.is_cuda)
    return dict(result, y=outputs["y"].detach(), dx=x.grad.detach().clone())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="1,4096,1024", help="B,L,D (default: a mega200M layer at 4K)")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--block", type=int, default=2048, help="the chunk grid (mega200M's chunk_size)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--scan-tiles", nargs="+", default=None,
                        help="TOKENS,GROUPS,WARPS[,SEGMENTS] per Triton row (default: the kernels' own)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    batch, length, dim = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    norm = TimestepNorm(dim, args.groups, 1e-5).to(args.device)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.1)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    x = (torch.randn(batch, length, dim, device=args.device) * 2 + 1).to(dtype).requires_grad_()
    dy = torch.randn(batch, length, dim, device=args.device)
    tilings = [tuple(int(v) for v in t.split(",")) for t in args.scan_tiles] if args.scan_tiles else [None]
    rows = [("triton", t) for t in tilings] + [("pytorch", None)] if x.is_cuda else [("pytorch", None)]
    print(f"TimestepNorm B={batch} L={length} D={dim} G={args.groups} block={args.block} {args.dtype} on "
          f"{args.device}\n")
    print("| path | forward + backward ms | GPU ms | max diff y | max diff dx |")
    print("|---|---|---|---|---|")
    from megalodon.ops.triton import timestep_norm as kernels

    first, SEGMENTS = None, kernels.SCAN_SEGMENTS
    for path, tiles in rows:
        os.environ[DISABLE_ENV] = "" if path == "triton" else "timestep_norm"
        if tiles is not None:
            kernels.SCAN_TOKENS, kernels.SCAN_GROUPS, kernels.SCAN_WARPS = tiles[:3]
            kernels.SCAN_SEGMENTS = tiles[3] if len(tiles) > 3 else SEGMENTS
            tiles = tiles[:3] + (kernels.SCAN_SEGMENTS,)
        result = measure(norm, x, dy, args.block, args.repeats)
        first = first or result
        diff_y = (result["y"] - first["y"]).abs().max().item()
        diff_dx = (result["dx"].float() - first["dx"].float()).abs().max().item()
        gpu = "-" if result["gpu_ms"] is None else f"{result['gpu_ms']:.3f}"
        label = path if tiles is None else (f"{path}, scan tiles {tiles[0]} x {tiles[1]}, {tiles[2]} warps, "
                                            f"{tiles[3]} segments")
        print(f"| {label} | {result['ms']:.2f} | {gpu} | {diff_y:.2e} | {diff_dx:.2e} |")


if __name__ == "__main__":
    main()
