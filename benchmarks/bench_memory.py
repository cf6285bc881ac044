"""Activation memory on any device: bytes that autograd keeps for backward, per token and per layer.

    python benchmarks/bench_memory.py                          # mega200M shapes, bf16 autocast, L = 2K and 4K
    python benchmarks/bench_memory.py --preset small --dtype fp32 --lengths 512 1024 --by-line
    TRITON_INTERPRET=1 python benchmarks/bench_memory.py --kernels --shrink 16   # the GPU's graph, on the CPU
    python benchmarks/bench_memory.py --compile --shrink 16     # what torch.compile's graphs of the blocks keep

Both models run one forward (batch 1, two layers) under `torch.autograd.graph.saved_tensors_hooks`. Every
tensor saved inside a block is counted once per storage (views share their base's bytes). The figure per token is
the slope between two lengths, so weights and their autocast copies, which do not grow with L, drop out.
What the hooks see is what the backward pass keeps, on any device: the GPU figure follows from the same graph
(allocator rounding and kernel workspaces aside). `--by-line` attributes the bytes to the line of this package
that saved them.

On a GPU the CEMA and the TimestepNorm run as Triton custom ops, which save other tensors than the PyTorch path.
`--kernels` counts that graph on the CPU: the kernels run under Triton's interpreter (TRITON_INTERPRET=1), which
is slow, so `--shrink` divides every width of the preset; the bytes of every saved tensor scale with the widths,
and the figures printed are multiplied back.
"""

from __future__ import annotations

import argparse
import traceback
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from op_counts import build, run_the_gpu_code

from megalodon import MegalodonConfig

PACKAGE = str(Path(__file__).resolve().parent.parent / "src" / "megalodon")


def saved_bytes(model, length: int, dtype: str, by_line: bool) -> tuple[int, dict[str, int]]:
    """Bytes saved for backward inside the model's blocks during one forward of `length` tokens."""
    seen: set[int] = set()
    total, lines, inside = 0, defaultdict(int), [False]

    def pack(t: torch.Tensor):
        nonlocal total
        storage = t.untyped_storage()
        if inside[0] and not isinstance(t, torch.nn.Parameter) and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
            if by_line:
                frame = next((f for f in reversed(traceback.extract_stack()) if f.filename.startswith(PACKAGE)),
                             None)
                where = f"{Path(frame.filename).name}:{frame.lineno} {frame.line}" if frame else "?"
                lines[where] += storage.nbytes()
        return t

    for block in model.layers:
        block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
        block.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(ids)
    return total, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mega200M")
    parser.add_argument("--lengths", nargs=2, type=int, default=[2048, 4096])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--by-line", action="store_true")
    parser.add_argument("--kernels", action="store_true",
                        help="run the GPU's code: the Triton kernels under the interpreter (needs TRITON_INTERPRET=1)")
    parser.add_argument("--shrink", type=int, default=1, help="divide the preset's widths by this (default 1)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each block (the trainer's --compile): what a compiled graph keeps")
    args = parser.parse_args()
    if args.kernels and not run_the_gpu_code():
        parser.error("--kernels needs triton installed and TRITON_INTERPRET=1 set before Python starts")

    short, long = args.lengths
    path = ("Triton kernels (interpreter)" if args.kernels else "PyTorch path") + (", compiled blocks" if args.compile
                                                                                     else "")
    widths = f", widths / {args.shrink} (figures x {args.shrink})" if args.shrink > 1 else ""
    print(f"preset {args.preset}, {args.dtype}, batch 1, lengths {short} and {long}, {args.layers} layers, "
          f"{path}{widths}\n")
    print("| model | bytes per token per layer | ratio to the Llama |")
    print("|---|---|---|")
    per_token = {}
    for arch in ("llama", "megalodon"):
        chunk = MegalodonConfig.from_preset(args.preset).chunk_size
        model = build(arch, args.preset, args.layers, chunk, args.shrink).train()
        if args.compile:
            torch._dynamo.config.automatic_dynamic_shapes = False  # a graph per length, as a run of one length has
            model.compile_blocks()
        (small, _), (large, lines) = (saved_bytes(model, n, args.dtype, args.by_line) for n in (short, long))
        per_token[arch] = (large - small) / (long - short) / args.layers * args.shrink
        ratio = per_token[arch] / per_token["llama"]
        print(f"| {arch} | {per_token[arch]:,.0f} | {ratio:.2f} |", flush=True)
        if args.by_line:
            for where, nbytes in sorted(lines.items(), key=lambda kv: -kv[1]):
                print(f"    {nbytes / long / args.layers * args.shrink:10,.0f}  {where}")


if __name__ == "__main__":
    main()
