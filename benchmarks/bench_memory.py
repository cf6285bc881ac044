"""Activation memory on any device: bytes that autograd keeps for backward, per token and per layer.

    python benchmarks/bench_memory.py                          # mega200M shapes, bf16 autocast, L = 2K and 4K
    python benchmarks/bench_memory.py --preset small --dtype fp32 --lengths 512 1024 --by-line
    TRITON_INTERPRET=1 python benchmarks/bench_memory.py --kernels --shrink 16   # the GPU's graph, on the CPU
    python benchmarks/bench_memory.py --compile --shrink 16     # what torch.compile's graphs of the blocks keep
    python benchmarks/bench_memory.py --loss --lengths 4096 32768   # the head and the loss, the two ways

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

`--loss` counts what the blocks leave out: the embedding, the final norm, the head and the next-token loss, for
one forward at each length at the preset's own widths and vocabulary (on the meta device: nothing is computed),
with the loss taken the two ways: cross_entropy of the logits, and the models' `targets=` (ops/loss.py), which
never holds every logit.
"""

from __future__ import annotations

import argparse
import traceback
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from op_counts import build, run_the_gpu_code

from megalodon import MegalodonConfig

PACKAGE = str(Path(__file__).resolve().parent.parent / "src" / "megalodon")


@contextmanager
def block_flag(model):
    """A one-element list that holds True while one of the model's blocks runs (forward hooks, removed after)."""
    inside = [False]
    hooks = [h for block in model.layers for h in (
        block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
        block.register_forward_hook(lambda *_: inside.__setitem__(0, False)))]
    try:
        yield inside
    finally:
        for hook in hooks:
            hook.remove()


def saved_bytes(model, length: int, dtype: str, by_line: bool) -> tuple[int, dict[str, int]]:
    """Bytes saved for backward inside the model's blocks during one forward of `length` tokens."""
    seen: set[int] = set()
    total, lines = 0, defaultdict(int)

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

    ids = torch.randint(0, model.config.vocab_size, (1, length))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    with block_flag(model) as inside, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(ids)
    return total, lines


def outside_blocks(arch: str, preset: str, length: int) -> dict[str, int]:
    """Bytes saved outside the blocks (embedding, final norm, head, loss) in one bf16 forward of `length` tokens,
    the loss as cross_entropy of the logits and as the model's targets=."""
    import torch.nn.functional as F

    from megalodon import Megalodon
    from megalodon.baseline import Llama, matched_llama_config

    config = MegalodonConfig.from_preset(preset, num_layers=1)
    with torch.device("meta"):
        model = (Megalodon(config) if arch == "megalodon" else Llama(matched_llama_config(config))).bfloat16()
    ids = torch.randint(0, config.vocab_size, (1, length), device="meta")
    targets = torch.randint(0, config.vocab_size, (1, length), device="meta")
    ways = {"logits": lambda: F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), reduction="sum"),
            "targets": lambda: model(ids, targets=targets)}
    out = {}
    for way, forward in ways.items():
        kept = {}
        with block_flag(model) as inside:
            def pack(t: torch.Tensor):
                if not inside[0] and not isinstance(t, torch.nn.Parameter):
                    kept[id(t)] = t  # once per tensor (meta tensors have no storage to tell apart), kept alive
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                forward()
        out[way] = sum(t.numel() * t.element_size() for t in kept.values())
    return out


@contextmanager
def meta_autocast():
    """torch.autocast refuses the meta device even to be turned off, as the norms and the loss do: let it pass."""
    real = torch.autocast
    torch.autocast = lambda device_type, *args, **kwargs: (nullcontext() if device_type == "meta"
                                                           else real(device_type, *args, **kwargs))
    try:
        yield
    finally:
        torch.autocast = real


def print_loss_table(preset: str, lengths: list[int]) -> None:
    print(f"preset {preset}, bf16, batch 1: bytes saved for backward outside the blocks (embedding, final norm, "
          "head, loss), GB\n")
    print("| model | L | logits + cross_entropy | targets= (blocked) | saved |")
    print("|---|---|---|---|---|")
    with meta_autocast():
        for arch in ("megalodon", "llama"):
            for length in lengths:
                got = outside_blocks(arch, preset, length)
                print(f"| {arch} | {length:,} | {got['logits'] / 1e9:.2f} | {got['targets'] / 1e9:.2f} | "
                      f"{(got['logits'] - got['targets']) / 1e9:.2f} |", flush=True)


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
    parser.add_argument("--loss", action="store_true",
                        help="the head and the loss outside the blocks, as logits or with targets= (meta device)")
    args = parser.parse_args()
    if args.loss:
        return print_loss_table(args.preset, args.lengths)
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
