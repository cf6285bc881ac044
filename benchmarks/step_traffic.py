"""What one training step's kernels compute and move per layer, Megalodon against the matched Llama, at the GPU
benchmark's shape, counted on a CPU; and the step time that implies at a GPU's rates (a roofline estimate).

    python benchmarks/step_traffic.py                              # mega200M at 4K, eager and compiled blocks
    python benchmarks/step_traffic.py --length 16384 --modes eager
    python benchmarks/step_traffic.py --tflops 600 --flash-tflops 350 --bandwidth 3.0      # H100-like rates

The step is bench_gpu.py's: batch 1, bf16 autocast over fp32 weights, forward and backward, the GPU's code path
(every Triton kernel on; the chunk attention in query blocks, as a CUDA-graph step runs it). Counted per layer (a
one-layer and a two-layer model, differenced):
- GEMM FLOPs: every matmul as executed (Megalodon's chunk attention included, masked products too);
- flash FLOPs: the Llama's causal attention kernel (forward, and a backward that recomputes the scores: 2.5x);
- bytes: what every other kernel reads and writes, each tensor argument once. Eager: each aten op and Triton
  launch is a kernel. Compiled (each block through torch.compile, as the trainer's --compile): the kernels
  Inductor generates, as its scheduler sizes them (Inductor on the CPU; its fusion is close to what it does on a
  GPU), plus the Triton kernels inside the custom ops it keeps whole.
The Triton kernels and the Llama's attention do not run (their launches are counted and skipped; the attention
is a stand-in op of the same shapes, FLOPs and bytes): no output is meaningful, only shapes, and a long sequence
costs the CPU only the GEMMs.

The estimate takes each kind of work at one rate: it says which model moves or computes more, not how fast a
kernel runs. Kernels bound by latency rather than bytes (the CEMA's sequential steps, small launches) run slower
than it assumes, and nothing here counts the host: compare with bench_gpu.py's profile on a GPU.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import op_counts  # beside this file
import op_timing
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GEMMS = {"mm": (0, 1), "addmm": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2)}  # op: (a, b) argument positions
VOCAB = 256  # the embedding and the head fall out of the per-layer difference: small ones cost the CPU less
FLASH = {"causal_attention": 1.0, "causal_attention_backward": 2.5}  # the stand-ins below; backward recomputes


@torch.library.custom_op("step_traffic::causal_attention", mutates_args=())
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Where the Llama calls flash attention: its output's shape, nothing computed (only counted)."""
    return torch.empty(q.shape[:-1] + v.shape[-1:], dtype=v.dtype)


@causal_attention.register_fake
def _(q, k, v):
    return q.new_empty(q.shape[:-1] + v.shape[-1:], dtype=v.dtype)


@torch.library.custom_op("step_traffic::causal_attention_backward", mutates_args=())
def causal_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@causal_attention_backward.register_fake
def _(grad, q, k, v):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


causal_attention.register_autograd(lambda ctx, grad: causal_attention_backward(grad, *ctx.saved_tensors),
                                   setup_context=_save)


_SDPA = F.scaled_dot_product_attention


def flash_stand_in(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The Llama's causal training attention becomes the stand-in; any other call (Megalodon's SDPA paths) runs."""
    if attn_mask is None and is_causal and not dropout_p:
        return causal_attention(q, k, v)
    return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                 enable_gqa=enable_gqa)


class Tally:
    """FLOPs and bytes of one step, by kind of work and by kernel name."""

    def __init__(self):
        self.gemm_flops = self.flash_flops = 0.0
        self.bytes: Counter[str] = Counter()


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (a view and its base, or one tensor passed twice, count once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
    return sum(seen.values())


class _CountOps(TorchDispatchMode):
    """Eager ops: GEMM and flash FLOPs, and every other kernel's bytes."""

    def __init__(self, tally: Tally):
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in GEMMS:
            a, b = (args[i] for i in GEMMS[name])
            self.tally.gemm_flops += 2 * a.numel() * b.shape[-1]
        elif func.namespace == "step_traffic":
            batch, heads, length, dim = args[1 if "backward" in name else 0].shape
            self.tally.flash_flops += FLASH[name] * 2 * 2 * batch * heads * length * length * dim / 2  # causal half
            self.tally.bytes["flash attention (its inputs and outputs)"] += tensor_bytes(tree_flatten((args, out))[0])
        elif name not in op_counts.NO_KERNEL and name not in op_counts.MAYBE_NOTHING:
            self.tally.bytes[f"aten:{name}"] += tensor_bytes(tree_flatten((args, kwargs, out))[0])
        return out


@contextmanager
def triton_launches_counted(tally: Tally):
    """Every Triton kernel of this package skipped at launch, its tensor arguments' bytes counted."""
    kernels = op_counts.triton_kernels()

    def launch(*args, _name, **kwargs):
        tally.bytes[f"triton:{_name}"] += tensor_bytes(args)

    saved = {id(k): k.run for k in kernels}
    for kernel in kernels:
        kernel.run = lambda *a, _name=kernel.fn.__name__, **k: launch(*a, _name=_name, **k)
    try:
        yield
    finally:
        for kernel in kernels:
            kernel.run = saved[id(kernel)]


@contextmanager
def inductor_kernels_counted(tally: Tally):
    """The bytes of every kernel Inductor generates while compiling inside the block (not the GEMMs and custom
    ops it calls: those are counted where they run), as its scheduler sizes them."""
    from torch._inductor import graph, ir

    codegen = graph.GraphLowering.codegen

    def counted(self, *args, **kwargs):
        result = codegen(self, *args, **kwargs)
        for node in self.scheduler.nodes:
            inner = getattr(node, "node", None)
            if not isinstance(inner, ir.ExternKernel):  # a generated kernel (fused or not)
                tally.bytes["inductor kernels"] += node.get_read_write_buffers_sizes()
        return result

    graph.GraphLowering.codegen = counted
    try:
        with torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False):
            yield
    finally:
        graph.GraphLowering.codegen = codegen


def kind(entry: str) -> str:
    """The kind bench_gpu.py's profile files a tally entry's kernels under (op_timing.KERNEL_KINDS), so that a GPU
    run's per-kind times can be read against these bytes."""
    if entry.startswith("triton:"):
        return op_timing.kind_of(entry.removeprefix("triton:"))
    if entry == "inductor kernels":
        return "compiled: fused by Inductor"
    if entry.startswith("flash"):
        return "attention: flash / SDPA"
    return "torch's kernels (eager: elementwise, copies and casts, norms, reductions)"


def by_kind(tallies: dict, bandwidth: float, tflops: float, flash_tflops: float) -> None:
    """Per layer and kind of kernel: the estimate's milliseconds (GB at the bandwidth, FLOPs at their rate)."""
    columns = list(tallies)
    rows: dict[str, list[float]] = {"GEMMs": [t.gemm_flops / tflops / 1e9 for t in tallies.values()]}
    for i, tally in enumerate(tallies.values()):
        for entry, size in tally.bytes.items():
            rows.setdefault(kind(entry), [0.0] * len(columns))[i] += size / bandwidth / 1e9
    rows["attention: flash / SDPA"] = [ms + t.flash_flops / flash_tflops / 1e9 for ms, t in
                                       zip(rows.get("attention: flash / SDPA", [0.0] * len(columns)),
                                           tallies.values())]
    print("\nEstimated ms per layer by kind of kernel (bench_gpu.py's profile kinds; its figures are per step):\n")
    print("| kind | " + " | ".join(f"{arch} {mode}" for mode, arch in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, values in rows.items():
        if any(values):
            print(f"| {name} | " + " | ".join(f"{ms:.3f}" for ms in values) + " |")


def build(arch: str, preset: str, layers: int) -> torch.nn.Module:
    from megalodon import Megalodon, MegalodonConfig
    from megalodon.baseline import Llama, matched_llama_config

    config = MegalodonConfig.from_preset(preset, num_layers=layers, vocab_size=VOCAB)  # the head is not a layer
    torch.manual_seed(0)
    return (Megalodon(config) if arch == "megalodon" else Llama(matched_llama_config(config))).train()


def step(model: torch.nn.Module, length: int, mode: str) -> Tally:
    """One training step's tally; compiled: each block through torch.compile (the compile counted, then run)."""
    from megalodon.ops.attention import launches_without_host_cost

    tally = Tally()
    ids = torch.randint(0, VOCAB, (1, length))
    if mode == "compiled":
        torch._dynamo.reset()
        for block in model.layers:
            block.compile()
    with torch.autocast("cpu", dtype=torch.bfloat16), launches_without_host_cost(), \
            triton_launches_counted(tally):
        if mode == "eager":
            with _CountOps(tally):
                F.cross_entropy(model(ids)[0].float(), ids[0]).backward()
        else:
            with inductor_kernels_counted(tally):
                F.cross_entropy(model(ids)[0].float(), ids[0]).backward()
    return tally


def per_layer(arch: str, preset: str, length: int, mode: str) -> Tally:
    """A two-layer step minus a one-layer step. Compiled: the blocks of a model share their compiled code, so
    Inductor's kernels are counted once per model, which is once per layer; the rest is differenced."""
    one, two = (step(build(arch, preset, n), length, mode) for n in (1, 2))
    if mode == "compiled":  # eager parts (embedding, head, loss) were not counted; GEMMs come from the eager count
        layer = Tally()
        layer.bytes = Counter({k: two.bytes[k] - one.bytes.get(k, 0) for k in two.bytes if k.startswith("triton")})
        layer.bytes["inductor kernels"] = one.bytes["inductor kernels"]
        return layer
    layer = Tally()
    layer.gemm_flops, layer.flash_flops = two.gemm_flops - one.gemm_flops, two.flash_flops - one.flash_flops
    layer.bytes = Counter({k: two.bytes[k] - one.bytes.get(k, 0) for k in two.bytes})
    return layer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mega200M")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--tflops", type=float, default=600.0, help="GEMM rate, TFLOP/s (default 600)")
    parser.add_argument("--flash-tflops", type=float, default=350.0, help="flash attention's rate (default 350)")
    parser.add_argument("--bandwidth", type=float, default=3.0, help="memory bandwidth, TB/s (default 3.0)")
    parser.add_argument("--top", type=int, default=8, help="list each model's N largest movers of bytes")
    parser.add_argument("--json", help="also write the per-layer tallies to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    op_counts.run_the_gpu_code(interpreted=False, one_kernel_norms=False)
    F.scaled_dot_product_attention = flash_stand_in  # the Llama's attention counted, never run

    eager = {arch: per_layer(arch, args.preset, args.length, "eager") for arch in ("megalodon", "llama")}
    print(f"{args.preset}, batch 1 x {args.length}, bf16 autocast, forward + backward, per layer; estimate at "
          f"{args.tflops:g} TFLOP/s (GEMMs), {args.flash_tflops:g} (flash attention), {args.bandwidth:g} TB/s\n")
    print("| model | mode | GEMM GFLOP | flash GFLOP | other kernels GB | est. ms: GEMM | flash | bytes | total |")
    print("|---|---|---|---|---|---|---|---|---|")
    totals, tallies = {}, {}
    for mode in args.modes:
        for arch in ("megalodon", "llama"):
            tally = eager[arch] if mode == "eager" else per_layer(arch, args.preset, args.length, mode)
            tally.gemm_flops, tally.flash_flops = eager[arch].gemm_flops, eager[arch].flash_flops
            flash_io = eager[arch].bytes["flash attention (its inputs and outputs)"]  # a custom op when compiled
            if mode == "compiled" and flash_io:
                tally.bytes["flash attention (its inputs and outputs)"] = flash_io
            gemm_ms = tally.gemm_flops / args.tflops / 1e9
            flash_ms = tally.flash_flops / args.flash_tflops / 1e9
            bytes_ms = sum(tally.bytes.values()) / args.bandwidth / 1e9
            totals[mode, arch], tallies[mode, arch] = gemm_ms + flash_ms + bytes_ms, tally
            print(f"| {arch} | {mode} | {tally.gemm_flops / 1e9:.0f} | {tally.flash_flops / 1e9:.0f} | "
                  f"{sum(tally.bytes.values()) / 1e9:.2f} | {gemm_ms:.3f} | {flash_ms:.3f} | {bytes_ms:.3f} | "
                  f"{gemm_ms + flash_ms + bytes_ms:.3f} |")
    print()
    for mode in args.modes:
        print(f"{mode}: estimated Megalodon / Llama tokens/s per layer: "
              f"{totals[mode, 'llama'] / totals[mode, 'megalodon']:.2f}")
    by_kind(tallies, args.bandwidth, args.tflops, args.flash_tflops)
    if args.json:
        rows = [{"model": arch, "mode": mode, "gemm_flops": t.gemm_flops, "flash_flops": t.flash_flops,
                 "bytes": dict(t.bytes), "estimated_ms": totals[mode, arch]} for (mode, arch), t in tallies.items()]
        Path(args.json).write_text(json.dumps(rows, indent=1))
    for (mode, arch), tally in tallies.items():
        top = ", ".join(f"{name} {size / 1e6:.0f}" for name, size in tally.bytes.most_common(args.top))
        print(f"\n{arch}, {mode}, MB: {top}")


if __name__ == "__main__":
    main()
