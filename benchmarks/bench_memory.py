"""Activation memory on any device: bytes that autograd keeps for backward, per token and per layer.

    python benchmarks/bench_memory.py                          # mega200M shapes, bf16 autocast, L = 2K and 4K
    python benchmarks/bench_memory.py --preset small --dtype fp32 --lengths 512 1024 --by-line

Both models run one forward (batch 1, two layers) under `torch.autograd.graph.saved_tensors_hooks`. Every
tensor saved inside a block is counted once per storage (views share their base's bytes). The figure per token is
the slope between two lengths, so weights and their autocast copies, which do not grow with L, drop out.
What the hooks see is what the backward pass keeps, on any device: the GPU figure follows from the same graph
(allocator rounding and kernel workspaces aside). `--by-line` attributes the bytes to the line of this package
that saved them.
"""

from __future__ import annotations

import argparse
import traceback
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch

PACKAGE = str(Path(__file__).resolve().parent.parent / "src" / "megalodon")


def build(arch: str, preset: str, layers: int):
    from megalodon import Megalodon, MegalodonConfig
    from megalodon.baseline import Llama, matched_llama_config

    config = MegalodonConfig.from_preset(preset, num_layers=layers)
    torch.manual_seed(0)
    return Megalodon(config) if arch == "megalodon" else Llama(matched_llama_config(config))


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
    args = parser.parse_args()

    short, long = args.lengths
    print(f"preset {args.preset}, {args.dtype}, batch 1, lengths {short} and {long}, {args.layers} layers\n")
    print("| model | bytes per token per layer | ratio to the Llama |")
    print("|---|---|---|")
    per_token = {}
    for arch in ("llama", "megalodon"):
        model = build(arch, args.preset, args.layers)
        (small, _), (large, lines) = (saved_bytes(model, n, args.dtype, args.by_line) for n in (short, long))
        per_token[arch] = (large - small) / (long - short) / args.layers
        ratio = per_token[arch] / per_token["llama"]
        print(f"| {arch} | {per_token[arch]:,.0f} | {ratio:.2f} |", flush=True)
        if args.by_line:
            for where, nbytes in sorted(lines.items(), key=lambda kv: -kv[1]):
                print(f"    {nbytes / long / args.layers:10,.0f}  {where}")


if __name__ == "__main__":
    main()
