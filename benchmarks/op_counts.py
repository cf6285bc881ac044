"""Tensor ops per layer of a training step and of a decode step, Megalodon against the matched Llama, counted on
a CPU as a GPU would launch them.

    TRITON_INTERPRET=1 python benchmarks/op_counts.py                   # mega200M's layers, fp32 and bf16
    TRITON_INTERPRET=1 python benchmarks/op_counts.py --preset small --dtypes fp32

On a GPU every op is a kernel launch in eager mode and a node of the CUDA graph that a decode step replays; where
the ops are small, their number rather than their FLOPs sets the speed (issue 11: a decode step of mega200M was
about 1,500 launches). The CPU runs the code the GPU runs: every Triton kernel forced on (under Triton's
interpreter, which TRITON_INTERPRET=1 must turn on before the kernels are imported) and every value check in its
device form. Views launch nothing and are not counted. Per layer: a one-layer and a two-layer model, differenced,
so that the embedding, the head and the per-step setup fall out (they are printed apart, as "outside").

How many ops run depends on a layer's structure (which projections, norms and attention path it has), not on
its widths or on how many chunks a sequence spans, so the count keeps the preset's every option and divides its
widths by --shrink, and shortens Megalodon's chunk to --chunk: the interpreter is slow. Training is forward +
backward of one sequence of --length tokens. bf16 means autocast for training and a bf16 model for decode, as
bench_gpu.py runs them. Under torch.compile, Inductor fuses most elementwise ops: these counts are the eager path's.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that only make views or metadata: no kernel
NO_KERNEL = {"view", "_unsafe_view", "unsqueeze", "squeeze", "select", "slice", "t", "transpose", "permute",
             "expand", "as_strided", "alias", "detach", "unflatten", "reshape", "split", "split_with_sizes",
             "unbind", "chunk", "view_as_real", "view_as_complex", "scalar_tensor", "promote_types", "_reshape_alias",
             "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}

# ops that copy only when they must (a custom op's body can meet them before they resolve): count what they run
MAYBE_NOTHING = {"to", "contiguous", "reshape", "flatten", "type_as"}


class OpCounter(TorchDispatchMode):
    """Counts the ops that launch a kernel, by name: aten ops, the aten ops inside this package's custom ops
    (which a dispatch mode would otherwise see as one op), and Triton launches ("triton:<kernel>")."""

    active: "OpCounter | None" = None  # the counter the Triton launch hooks report to

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __enter__(self):
        self._outer = getattr(self, "_outer", []) + [OpCounter.active]  # re-entered inside custom ops
        OpCounter.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        OpCounter.active = self._outer.pop()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "megalodon":  # a custom op: count what its implementation runs, not the op itself
            from torch._library.custom_ops import OPDEFS

            with self:
                return OPDEFS[func.name().split(".")[0]]._init_fn(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "native_layer_norm_backward" and args[5] is not None:  # CUDA reduces the weight's gradient apart
            self.ops["native_layer_norm_backward (weight)"] += 1
        if name in MAYBE_NOTHING:
            with self:
                return func.decompose(*args, **(kwargs or {}))
        if name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def triton_kernels() -> list:
    """Every Triton kernel of this package (ops/triton/*), the launchable ones (a `.run` to stand in for)."""
    import importlib
    import pkgutil

    import triton

    import megalodon.ops.triton as package

    kernels = {}  # by identity: a module that imports another's kernel names it too
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        kernels.update((id(kernel), kernel) for kernel in vars(module).values()
                       if isinstance(kernel, triton.runtime.jit.KernelInterface) and hasattr(kernel, "run"))
    return list(kernels.values())


def count_triton_launches() -> None:
    """Count every launch of this package's Triton kernels into the active OpCounter, as one op each (the
    interpreter's own tensor traffic during a launch is not counted: a GPU has none)."""

    def counted(*args, _name, _run, **kwargs):
        counter, OpCounter.active = OpCounter.active, None
        try:
            if counter is not None:
                counter.ops[f"triton:{_name}"] += 1
            with torch.utils._python_dispatch._disable_current_modes():
                return _run(*args, **kwargs)
        finally:
            OpCounter.active = counter

    for kernel in triton_kernels():
        kernel.run = functools.partial(counted, _name=kernel.fn.__name__, _run=kernel.run)


class _OneKernelRMSNorm(torch.autograd.Function):
    """F.rms_norm as CUDA runs it: one op forward (aten._fused_rms_norm) and one backward, which launches a second
    kernel for the weight's gradient (GammaBetaBackward, as the LayerNorm's backward does: both in the H100 trace),
    each with a copy first where x is not contiguous, keeping x, one rstd per row and the weight (what
    bench_memory.py sees). The CPU has no such kernel and composes it of several ops, which run here uncounted."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        if OpCounter.active is not None:
            OpCounter.active.ops["_fused_rms_norm"] += 1
            OpCounter.active.ops["contiguous (in _fused_rms_norm)"] += not x.is_contiguous()  # CUDA's copies first
        with torch.utils._python_dispatch._disable_current_modes():
            rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + (torch.finfo(x.dtype).eps if eps is None else eps))
            out = _composed_rms_norm(x, x.shape[-1:], weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        x, _, weight = ctx.saved_tensors
        if OpCounter.active is not None:
            OpCounter.active.ops["_fused_rms_norm_backward"] += 1
            OpCounter.active.ops["_fused_rms_norm_backward (weight)"] += weight is not None
            OpCounter.active.ops["contiguous (in _fused_rms_norm_backward)"] += not x.is_contiguous()
        with torch.utils._python_dispatch._disable_current_modes(), torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (x, weight) if t is not None]
            out = _composed_rms_norm(inputs[0], x.shape[-1:], inputs[1] if weight is not None else None, ctx.eps)
            grads = torch.autograd.grad(out, inputs, grad)
        return grads[0], grads[1] if weight is not None else None, None


_composed_rms_norm = torch.nn.functional.rms_norm


def one_kernel_rms_norm(x, normalized_shape, weight=None, eps=None):
    return _OneKernelRMSNorm.apply(x, weight, eps)


def run_the_gpu_code(interpreted: bool = True, one_kernel_norms: bool = True) -> bool:
    """Force the Triton kernels on for CPU tensors, the RMSNorms onto torch's fused kernel and the value checks
    into their device form; False (and the PyTorch path of the CEMA and the norm counted) where triton or its
    interpreter is missing. interpreted=False: the kernels launch through triton's own launcher, which the caller
    has pointed somewhere (host_overhead.py), and are not counted. one_kernel_norms=False: F.rms_norm stays
    itself (a caller that compiles, or that counts bytes rather than ops)."""
    import importlib.util
    import os

    import megalodon.inference.decoding  # noqa: F401  (every module that checks values, imported before the patch)
    from megalodon import validation
    from megalodon.ops import attention, cema, fused, static_kv, timestep_norm

    rule = validation.host_reads_free  # read once: validation itself is one of the modules patched
    for name, module in list(sys.modules.items()):
        if name.startswith("megalodon") and getattr(module, "host_reads_free", None) is rule:
            module.host_reads_free = lambda tensor: False
    from megalodon.baseline import llama

    for module in (fused, llama):  # the RMSNorms on torch's fused kernel, counted as CUDA runs it
        module.FUSED_RMS_NORM_DEVICES = fused.FUSED_RMS_NORM_DEVICES | {"cpu"}
    if one_kernel_norms:
        torch.nn.functional.rms_norm = one_kernel_rms_norm
    if importlib.util.find_spec("triton") is None or (interpreted and os.environ.get("TRITON_INTERPRET") != "1"):
        return False
    for module in (attention, cema, fused, static_kv, timestep_norm):
        module.use_triton = lambda op, *tensors: True
    if interpreted:
        count_triton_launches()
    return True


def split_queries_as_cuda_would(preset: str) -> None:
    """The chunk attention's query blocks as CUDA picks them for the preset's own chunk in a long call or a
    CUDA-graph step (ops/attention.py's query_blocks): that chunk's split_queries, scaled to whatever --chunk and
    --length count with (--split-queries)."""
    from megalodon import MegalodonConfig
    from megalodon.ops import attention

    count = len(attention.split_queries(MegalodonConfig.from_preset(preset).chunk_size))

    def blocks(queries, q):
        edges = [queries * i // count for i in range(count + 1)] if queries >= count else [0, queries]
        return list(zip(edges[:-1], edges[1:]))

    attention.query_blocks = blocks


def build(arch: str, preset: str, layers: int, chunk: int, shrink: int) -> torch.nn.Module:
    """The preset's layer, `layers` of them, its widths divided by `shrink`."""
    from megalodon import Megalodon, MegalodonConfig
    from megalodon.baseline import Llama, matched_llama_config

    full = MegalodonConfig.from_preset(preset)
    widths = {name: getattr(full, name) // shrink for name in ("model_dim", "z_dim", "value_dim", "ffn_hidden_dim")}
    config = MegalodonConfig.from_preset(preset, num_layers=layers, vocab_size=256, chunk_size=chunk, **widths)
    torch.manual_seed(0)
    return Megalodon(config) if arch == "megalodon" else Llama(matched_llama_config(config))


def training_ops(model, length: int, dtype: str, documents: int | None = None) -> int:
    """documents: a second document starts at this position (on Megalodon's chunk grid), as the trainer's packed
    batches pass doc_start; None: one sequence, as bench_gpu.py's steps."""
    ids = torch.randint(0, 256, (1, length))
    inputs = {}
    if documents is not None:
        inputs["doc_start"] = torch.zeros(1, length, dtype=torch.bool)
        inputs["doc_start"][0, [0, documents]] = True
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        model(ids, **inputs).float().square().mean().backward()  # warm-up: lazy initializations
        model.zero_grad(set_to_none=True)
        with OpCounter() as counter:
            model(ids, **inputs).float().square().mean().backward()
    return sum(counter.ops.values())


def decode_ops(model, dtype: str) -> int:
    from megalodon import Megalodon
    from megalodon.decode_state import DecodeState
    from megalodon.inference.decoding import StaticDecoder

    model = model.eval().to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    with torch.no_grad():
        if isinstance(model, Megalodon):
            _, state = model(torch.randint(0, 256, (1, 5)), return_state=True)
            state = DecodeState.from_state(state, model.config)
        else:
            _, past = model(torch.randint(0, 256, (1, 5)), return_past=True)
            state = model.static_cache(1, 64, past)
        decoder = StaticDecoder(model, state)
        ids = torch.tensor([3])
        decoder.step(ids)
        with OpCounter() as counter:
            decoder.step(ids)
    return sum(counter.ops.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mega200M")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--length", type=int, default=64, help="training tokens (default 64)")
    parser.add_argument("--chunk", type=int, default=32, help="Megalodon's chunk for the count (default 32)")
    parser.add_argument("--shrink", type=int, default=16, help="divide the preset's widths by this (default 16)")
    parser.add_argument("--split-queries", action="store_true",
                        help="count the chunk attention in blocks of queries, as CUDA runs a long call (16K "
                             "tokens and more at mega200M) or a CUDA-graph step (4 blocks at mega200M); by "
                             "default one, as an eager step at 4K and batch 1")
    parser.add_argument("--documents", action="store_true",
                        help="training on two packed documents (doc_start), as the trainer's batches: document "
                             "restarts in the CEMA, the norm and the Llama's masks")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    kernels = run_the_gpu_code()
    if args.split_queries:
        split_queries_as_cuda_would(args.preset)
    path = "Triton kernels on (interpreter)" if kernels else "PyTorch path"
    print(f"{args.preset} layers (widths / {args.shrink}), {path}; ops that launch a kernel (views not counted)\n")
    print("| step | dtype | Megalodon per layer | Llama per layer | ratio | Megalodon outside | Llama outside |")
    print("|---|---|---|---|---|---|---|")
    second = args.chunk * (args.length // args.chunk // 2) if args.documents else None  # on the chunk grid
    for step, count in (("training", lambda m, d: training_ops(m, args.length, d, second)), ("decode", decode_ops)):
        for dtype in args.dtypes:
            per_layer, outside = {}, {}
            for arch in ("megalodon", "llama"):
                one, two = (count(build(arch, args.preset, n, args.chunk, args.shrink), dtype) for n in (1, 2))
                per_layer[arch], outside[arch] = two - one, 2 * one - two
            print(f"| {step} | {dtype} | {per_layer['megalodon']} | {per_layer['llama']} | "
                  f"{per_layer['megalodon'] / per_layer['llama']:.2f} | {outside['megalodon']} | {outside['llama']} |")


if __name__ == "__main__":
    main()
