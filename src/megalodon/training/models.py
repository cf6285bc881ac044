"""The model a training config describes: its architecture and size, the chunk grid its data is packed on, and
activation checkpointing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megalodon.baseline import Llama, matched_llama_config
from megalodon.config import MegalodonConfig
from megalodon.model import Megalodon
from megalodon.training.config import TrainConfig


def build_model(cfg: TrainConfig, vocab_size: int) -> torch.nn.Module:
    mega = MegalodonConfig.from_preset(cfg.preset, **{**cfg.model, "vocab_size": vocab_size})
    if cfg.model.get("vocab_size", vocab_size) != vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model['vocab_size']} does not match the tokenizer's "
                         f"vocab_size={vocab_size}; drop the override")
    if cfg.arch == "llama":
        return Llama(matched_llama_config(mega))
    return Megalodon(mega)


def load_initial_weights(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """cfg.init_from's weights into the run's model; the --model fields that keep no shape are the only ones that
    may differ from the directory's (TrainConfig took the rest from it)."""
    from megalodon.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_state_strict, read_config, verified_weights

    tensors = verified_weights(cfg.init_from)  # a damaged or non-finite file is refused as it is anywhere
    try:
        load_state_strict(model, tensors, str(Path(cfg.init_from) / WEIGHTS_NAME))
    except ValueError as err:  # keys or shapes: which of the run's fields made them differ
        saved, _ = read_config(Path(cfg.init_from) / CONFIG_NAME)
        changed = sorted(k for k, v in dataclasses.asdict(saved).items() if cfg.model.get(k, v) != v)
        raise ValueError(f"{err}. The run changes {', '.join(f'model.{k}' for k in changed) or 'no field'} of "
                         f"init_from's model: only fields that keep the weights' shapes may change") from None


def chunk_size_of(cfg: TrainConfig) -> int:
    """Both architectures pack documents on the Megalodon preset's chunk grid, so they see identical tokens."""
    return MegalodonConfig.from_preset(cfg.preset, **cfg.model).chunk_size


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        forward = block.forward
        block.forward = lambda *args, _f=forward, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)
