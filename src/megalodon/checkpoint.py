"""Pretrained weights on disk: `config.json` + `model.safetensors`, written atomically and loaded strictly."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from megalodon.config import MegalodonConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TIED_KEY = "output.output.weight"


def _persistent_tensors(model) -> dict[str, Tensor]:
    """The state_dict without the tied output weight (safetensors refuses shared storage)."""
    tensors = dict(model.state_dict())
    if model.config.share_emb:
        tensors.pop(TIED_KEY)
    return tensors


def save_pretrained(model, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in _persistent_tensors(model).items()}
    # Write both files into a temporary name first so that a crash leaves the old checkpoint whole.
    for name, write in ((WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"})),
                        (CONFIG_NAME, lambda p: model.config.save(p))):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, directory / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def read_weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path} (expected {WEIGHTS_NAME} beside {CONFIG_NAME})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupt")


def load_state_strict(model: nn.Module, tensors: dict[str, Tensor], source: str) -> None:
    """Copy tensors into the model, refusing missing keys, unknown keys and shape mismatches by name."""
    expected = _persistent_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unknown:
            parts.append(f"unknown key(s) {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
        raise ValueError(f"{source} does not fit this model: " + "; ".join(parts))
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[key].shape)}")
    with torch.no_grad():
        for key, tensor in tensors.items():
            expected[key].copy_(tensor)


def load_pretrained(directory: str | Path, map_location="cpu"):
    from megalodon.model import Megalodon

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no model directory at {directory}")
    config = MegalodonConfig.load(directory / CONFIG_NAME)
    tensors = read_weights(directory / WEIGHTS_NAME)
    with torch.device("meta"):
        model = Megalodon(config)
    model = model.to_empty(device=map_location)
    if config.share_emb:
        model.output.output.weight = model.embed.weight
    load_state_strict(model, tensors, str(directory / WEIGHTS_NAME))
    return model
