"""Model FLOPs per trained token, Megalodon against the matched Llama: the matmul work each one needs.

    python benchmarks/model_flops.py                                  # mega200M and mega1.3B at 4K to 32K
    python benchmarks/model_flops.py --presets small --lengths 1024

The convention is the usual one for model FLOPs utilization (as in the PaLM paper): a trained token costs three
times its forward matmul FLOPs (the backward pass does two matmuls for each of the forward's), recomputation is not
counted, and attention counts its causal work only: each query against the keys it sees, its chunk's earlier
tokens for Megalodon, every earlier token for the Llama. Elementwise work (norms, the CEMA, activations) is not
counted. Both models are measured by the same rule, so the ratio of their FLOPs per token is the speed ratio
they would have at equal TFLOP/s; `bench_gpu.py` prints the TFLOP/s each one reached.

Megalodon's materialized attention computes whole chunk x chunk products (the masked half too), so it executes
more than it is credited with here; the Llama's flash attention skips the masked half.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


def linear_macs_per_token(model: nn.Module) -> int:
    """Multiply-adds per token of every nn.Linear (the output head included, tied or not): one per weight."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def mean_visible_keys(length: int, window: int) -> float:
    """Keys a query sees on average over a sequence of `length` tokens, attending causally inside aligned windows
    of `window` tokens (the whole sequence: window = length)."""
    full, rest = divmod(length, window)
    return (full * window * (window + 1) / 2 + rest * (rest + 1) / 2) / length


def attention_macs_per_token(config, length: int) -> float:
    """Causal attention multiply-adds per token: for each visible key, q.k and p.v over every head."""
    from megalodon import MegalodonConfig

    if isinstance(config, MegalodonConfig):
        return mean_visible_keys(length, config.chunk_size) * (config.z_dim + config.value_dim)
    return mean_visible_keys(length, length) * 2 * config.model_dim


def build(arch: str, preset: str, device: str | torch.device = "meta") -> nn.Module:
    """Megalodon at `preset` (arch "megalodon") or its matched Llama (arch "llama"), initialized on `device`;
    on "meta" it has shapes and no memory, which is all a count needs."""
    from megalodon import Megalodon, MegalodonConfig
    from megalodon.baseline import Llama, matched_llama_config

    config = MegalodonConfig.from_preset(preset)
    with torch.device(device):
        return Megalodon(config) if arch == "megalodon" else Llama(matched_llama_config(config))


def training_flops_per_token(model: nn.Module, length: int) -> float:
    """Model FLOPs of training on one token of a `length`-token sequence: 3 x 2 x (linear + attention) MACs."""
    return 6.0 * (linear_macs_per_token(model) + model.config.num_layers * attention_macs_per_token(model.config,
                                                                                                       length))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["mega200M", "mega1.3B"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384, 32768])
    args = parser.parse_args()
    print("| preset | L | Megalodon GFLOP/token | Llama GFLOP/token | Llama / Megalodon |")
    print("|---|---|---|---|---|")
    for preset in args.presets:
        models = {arch: build(arch, preset) for arch in ("megalodon", "llama")}
        for length in args.lengths:
            mega, llama = (training_flops_per_token(models[a], length) / 1e9 for a in ("megalodon", "llama"))
            print(f"| {preset} | {length:,} | {mega:.2f} | {llama:.2f} | {llama / mega:.2f} |")


if __name__ == "__main__":
    main()
