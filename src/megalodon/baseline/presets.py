"""Llama presets matched to Megalodon's by parameter count.

A match keeps the Megalodon preset's depth, width, tying and vocabulary, so the embedding parameters agree
exactly at any vocab size, and solves the SwiGLU width for the rest. The three table entries below are what
`matched_llama_config` returns at each preset's default vocab (a test holds them to it).
"""

from __future__ import annotations

from dataclasses import replace

from megalodon.baseline.llama import LlamaConfig
from megalodon.config import MegalodonConfig, count_parameters

MATCH_TOLERANCE = 0.05  # |llama / megalodon - 1| allowed
FFN_MULTIPLE = 16  # SwiGLU widths are rounded to this, for tidy matmul shapes

LLAMA_PRESETS: dict[str, dict] = {
    "tiny": dict(num_layers=2, model_dim=64, num_heads=2, ffn_hidden_dim=176, tie_embeddings=False,
                 vocab_size=256),
    "small": dict(num_layers=4, model_dim=256, num_heads=4, ffn_hidden_dim=816, tie_embeddings=True,
                  vocab_size=8192),
    "base": dict(num_layers=8, model_dim=384, num_heads=6, ffn_hidden_dim=1472, tie_embeddings=True,
                 vocab_size=8192),
}


def count_llama_parameters(config: LlamaConfig) -> int:
    """Parameters of Llama(config), from the shapes alone."""
    d, f = config.model_dim, config.ffn_hidden_dim
    block = 2 * d + 4 * d * d + 3 * d * f  # two norms, q/k/v/o, gate/up/down
    head = 0 if config.tie_embeddings else config.vocab_size * d
    return config.vocab_size * d + config.num_layers * block + d + head


def llama_head_dim(model_dim: int) -> int:
    """Llama's usual head sizes: 128 from 2048 wide, 64 from 256, 32 below (so tiny models get 2+ heads).
    A width none of these divides gets one head."""
    head_dim = 128 if model_dim >= 2048 else 64 if model_dim >= 256 else 32
    return head_dim if model_dim % head_dim == 0 else model_dim


def matched_llama_config(megalodon_preset: str | MegalodonConfig, vocab_size: int | None = None) -> LlamaConfig:
    """The Llama with Megalodon's depth, width and tying whose parameter count is closest to the preset's.

    megalodon_preset: a preset name or a MegalodonConfig. vocab_size: the tokenizer's; None keeps the config's.
    """
    overrides = {} if vocab_size is None else {"vocab_size": vocab_size}
    if isinstance(megalodon_preset, MegalodonConfig):
        mega = replace(megalodon_preset, **overrides)
    else:
        mega = MegalodonConfig.from_preset(megalodon_preset, **overrides)
    target = count_parameters(mega)
    d, layers = mega.model_dim, mega.num_layers
    narrowest = LlamaConfig(vocab_size=mega.vocab_size, num_layers=layers, model_dim=d,
                       num_heads=d // llama_head_dim(d), ffn_hidden_dim=FFN_MULTIPLE,
                       rope_base=mega.rope_theta, norm_eps=mega.norm_eps, tie_embeddings=mega.share_emb)
    # The count is linear in ffn_hidden_dim with slope 3 * d * layers: solve, then round to the multiple.
    slope = 3 * d * layers
    width = (target - count_llama_parameters(narrowest)) / slope + FFN_MULTIPLE
    config = replace(narrowest, ffn_hidden_dim=max(FFN_MULTIPLE, FFN_MULTIPLE * round(width / FFN_MULTIPLE)))
    found = count_llama_parameters(config)
    if abs(found / target - 1) > MATCH_TOLERANCE:
        raise ValueError(f"no Llama of depth {layers} and width {d} comes within {MATCH_TOLERANCE:.0%} of "
                         f"Megalodon {megalodon_preset!r} ({target:,} parameters); the closest has {found:,}")
    return config
