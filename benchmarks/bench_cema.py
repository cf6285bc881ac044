"""The CEMA alone, forward and forward + backward, on each path this machine has.

    python benchmarks/bench_cema.py                                   # CPU, the `small` training shape, fp32
    python benchmarks/bench_cema.py --device cuda --shape 1,4096,1024 --dtype bf16   # mega200M on a GPU

On CUDA both paths run: Triton (the default dispatch) and the PyTorch path (MEGALODON_DISABLE_TRITON=cema).
Prints a Markdown table: milliseconds (median of --repeats after a warm-up) and, on CUDA, the peak memory above
the inputs and the GPU's own time (the kernels' sum, from torch.profiler: the wall clock of a lone op is mostly
the host's). Document resets every 256 steps are on with --resets. --chunks sweeps the Triton kernels' steps per
chunk (ops/triton/cema.py's CHUNK): more chunks, more programs to fill the GPU, a longer scan over chunks.

    python benchmarks/bench_cema.py --device cuda --shape 1,4096,1024 --dtype bf16 --chunks 32 64 128

--prefetch sweeps whether the step kernels load each tile of steps one tile ahead (ops/triton/cema.py's
PREFETCH_FORWARD and PREFETCH_REVERSE), in the forward's runs, the adjoint's, both or neither: each chunk length
once per setting. --forms runs the chunks step by step (the step kernels), as matrix products on tensor cores
(ops/triton/cema.py's MATRIX_FORM, cema_matrix), or the backward's gradient pass as matrix products too
(MATRIX_BACKWARD), each setting once per form.

    python benchmarks/bench_cema.py --device cuda --shape 1,4096,1024 --dtype bf16 --forms steps matrix both
"""

from __future__ import annotations

import argparse
import os

import torch
from op_timing import time_op  # beside this file

from megalodon.layers.cema import CEMA
from megalodon.ops.triton import DISABLE_ENV


# --prefetch: (forward, reverse) for ops/triton/cema.py's PREFETCH_FORWARD and PREFETCH_REVERSE
PREFETCH_SETTINGS = {"none": (False, False), "forward": (True, False), "reverse": (False, True), "both": (True, True)}


def measure(layer: CEMA, x: torch.Tensor, resets: torch.Tensor | None, backward: bool, repeats: int) -> dict:
    def run() -> None:
        y, _ = layer(x, None, 256, resets)
        if backward:
            y.backward(torch.ones_like(y))

    return time_op(run, repeats, x.is_cuda)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="8,1024,256", help="B,L,D")
    parser.add_argument("--ndim", type=int, default=16)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--resets", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--chunks", nargs="+", type=int, default=None,
                        help="the Triton path once per steps-per-chunk (multiples of 16; default: the kernels' own)")
    parser.add_argument("--prefetch", nargs="+", default=None, choices=sorted(PREFETCH_SETTINGS),
                        help="the Triton path once per prefetch setting (default: the kernels' own)")
    parser.add_argument("--forms", nargs="+", default=None, choices=["steps", "matrix", "both"],
                        help="the Triton path with its chunk runs step by step, as matrix products, or those and the "
                             "backward's gradient pass as matrix products (default: the kernels' own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    batch, length, dim = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    layer = CEMA(dim, args.ndim).to(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    x = torch.randn(batch, length, dim, device=args.device, dtype=dtype, requires_grad=True)
    resets = None
    if args.resets:
        resets = torch.zeros(batch, -(-length // 256), dtype=torch.bool, device=args.device)
        resets[:, 1::2] = True
    paths = ([("triton", chunk, prefetch, form) for chunk in args.chunks or [None]
              for prefetch in args.prefetch or [None] for form in args.forms or [None]]
             + [("pytorch", None, None, None)] if x.is_cuda else [("pytorch", None, None, None)])
    print(f"CEMA B={batch} L={length} D={dim} N={args.ndim} {args.dtype} on {args.device}"
          f"{' with resets' if args.resets else ''}\n")
    print("| path | forward ms | forward + backward ms | fwd+bwd GPU ms | fwd+bwd peak MiB | tokens/s (fwd+bwd) |")
    print("|---|---|---|---|---|---|")
    for path, chunk, prefetch, form in paths:
        os.environ[DISABLE_ENV] = "" if path == "triton" else "cema"
        if path == "triton":
            from megalodon.ops.triton import cema as kernels

            if chunk is not None:
                kernels.CHUNK = chunk  # what ops/cema.py passes the op
            if prefetch is not None:
                kernels.PREFETCH_FORWARD, kernels.PREFETCH_REVERSE = PREFETCH_SETTINGS[prefetch]
            if form is not None:
                kernels.MATRIX_FORM, kernels.MATRIX_BACKWARD = form != "steps", form == "both"
        forward = measure(layer, x.detach(), resets, False, args.repeats)
        both = measure(layer, x, resets, True, args.repeats)
        gpu = "-" if both["gpu_ms"] is None else f"{both['gpu_ms']:.3f}"
        label = ", ".join([path] + ([f"chunk {chunk}"] if chunk else [])
                          + ([f"prefetch {prefetch}"] if prefetch else []) + ([form] if form else []))
        peak = "-" if both["peak_mib"] is None else f"{both['peak_mib']:.0f}"
        print(f"| {label} | {forward['ms']:.2f} | {both['ms']:.2f} | {gpu} | {peak} | "
              f"{batch * length / both['ms'] * 1e3:,.0f} |")


if __name__ == "__main__":
    main()
