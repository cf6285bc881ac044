"""The SiLU gates and the row norms of a training step (ops/fused.py), torch's ops against the Triton kernels.

    python benchmarks/bench_fused.py                          # CPU: torch's ops only, a small shape
    python benchmarks/bench_fused.py --device cuda            # mega200M's widths at 4K tokens, both paths

Forward + backward of each op as a MEGA layer and an FFN run it in eager bf16 training: the output gate
dropout-free `(attn * silu(gate)) @ Wh2^T` (bf16), the FFN's `silu(fc1 u) @ fc2^T` (bf16), the CEMA output's
RMSNorm (fp32 in, bf16 out) and the FFN's LayerNorm (fp32 in, bf16 out), each with its gradients. On CUDA each
runs on torch's ops (the RMSNorm on torch's fused kernel, each norm with its casts) and on the Triton kernels
(`silu_gate`, `norm_rows`). Prints a Markdown table: milliseconds (median of --repeats after a warm-up), the
GPU's own time (the kernels' sum, from torch.profiler: the figure to choose by) and the peak memory above the
inputs. A slower Triton row here is a kernel to turn off: MEGALODON_DISABLE_TRITON=silu_gate or norm_rows.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from op_timing import time_op  # beside this file

from megalodon import MegalodonConfig
from megalodon.ops import fused

KERNELS = ("silu_gate", "norm_rows")


def cases(config: MegalodonConfig, tokens: int, device: str) -> dict[str, Callable[[], None]]:
    """Forward + backward of each op at the config's widths, on fresh leaves made once."""
    torch.manual_seed(0)

    leaves = []

    def leaf(*shape, dtype=torch.bfloat16, scale=1.0):
        leaves.append((torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_())
        return leaves[-1]

    dim, dv, hidden = config.model_dim, config.value_dim, config.ffn_hidden_dim
    attn, gate, wh2 = leaf(1, tokens, dv), leaf(1, tokens, dv), leaf(dim, dv, scale=dv ** -0.5)
    up, fc2 = leaf(1, tokens, hidden), leaf(dim, hidden, scale=hidden ** -0.5)
    x = leaf(1, tokens, dim, dtype=torch.float32)
    weight, bias = leaf(dim, dtype=torch.float32, scale=0.1), leaf(dim, dtype=torch.float32, scale=0.1)
    grad_out = torch.randn(1, tokens, dim, device=device, dtype=torch.bfloat16)

    def run(out: torch.Tensor) -> None:
        out.backward(grad_out)
        for t in leaves:  # as a training step leaves them: no accumulation into the last step's gradients
            t.grad = None

    return {
        "output gate": lambda: run(fused.gated_linear(attn, gate, wh2)),
        "FFN SiLU": lambda: run(fused.gated_linear(None, up, fc2)),
        "RMSNorm": lambda: run(fused.rms_norm(x, weight, config.norm_eps, torch.bfloat16)),
        "LayerNorm": lambda: run(fused.layer_norm(x, weight + 1.0, bias, config.norm_eps, torch.bfloat16)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="mega200M")
    parser.add_argument("--tokens", type=int, default=None, help="tokens (default: 4096 on CUDA, 256 elsewhere)")
    parser.add_argument("--shrink", type=int, default=None,
                        help="divide the preset's widths by this (default: 1 on CUDA, 8 elsewhere)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    tokens = args.tokens or (4096 if cuda else 256)
    shrink = args.shrink or (1 if cuda else 8)
    full = MegalodonConfig.from_preset(args.preset)
    config = MegalodonConfig.from_preset(
        args.preset, **{name: getattr(full, name) // shrink for name in ("model_dim", "z_dim", "value_dim",
                                                                        "ffn_hidden_dim")})
    print(f"{args.preset} widths / {shrink} (D={config.model_dim}, dv={config.value_dim}, "
          f"FFN {config.ffn_hidden_dim}), {tokens} tokens, forward + backward on {args.device}\n")
    print("| op | path | forward + backward ms | GPU ms | peak MiB |")
    print("|---|---|---|---|---|")
    paths = ("pytorch", "triton") if cuda else ("pytorch",)
    default = fused.use_triton
    ops = cases(config, tokens, args.device)
    try:
        for name, op in ops.items():
            for path in paths:
                fused.use_triton = (default if path == "triton"
                                    else lambda op, *tensors: op not in KERNELS and default(op, *tensors))
                result = time_op(op, args.repeats, cuda)
                gpu = "-" if result["gpu_ms"] is None else f"{result['gpu_ms']:.3f}"
                peak = "-" if result["peak_mib"] is None else f"{result['peak_mib']:.0f}"
                print(f"| {name} | {path} | {result['ms']:.3f} | {gpu} | {peak} |")
    finally:
        fused.use_triton = default


if __name__ == "__main__":
    main()
