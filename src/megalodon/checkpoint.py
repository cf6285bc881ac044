"""Model directories on disk: `config.json` + `model.safetensors`, written atomically and loaded strictly.

One format serves both architectures of the project: `config.json` names its `architecture` ("megalodon" or
"llama", the matched baseline) beside the config's fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HF_ONLY_KEYS = ("transformers_version", "auto_map", "architectures")  # what only a transformers config.json holds


def architectures() -> dict[str, tuple[type, type]]:
    """architecture name -> (config class, model class)."""
    from megalodon.baseline import Llama, LlamaConfig
    from megalodon.config import MegalodonConfig
    from megalodon.model import Megalodon

    return {"megalodon": (MegalodonConfig, Megalodon), "llama": (LlamaConfig, Llama)}


def architecture_of(config) -> str:
    for name, (config_class, _) in architectures().items():
        if isinstance(config, config_class):
            return name
    raise TypeError(f"cannot save a {type(config).__name__}: not one of {sorted(architectures())}'s configs")


def _persistent_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The state_dict with each tied tensor once (safetensors refuses shared storage): the first name wins."""
    tensors, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if tensor.numel() and tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[key] = tensor
    return tensors


def write_config(config, path: str | Path) -> None:
    """config.json: the architecture's name beside the config's fields. A Megalodon's also names transformers'
    `model_type`, so that AutoModelForCausalLM reads the directory once megalodon.hf is imported."""
    arch = architecture_of(config)
    values = {"architecture": arch, **({"model_type": "megalodon"} if arch == "megalodon" else {}),
              **dataclasses.asdict(config)}
    Path(path).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def read_config(path: str | Path):
    """The config object a model directory's config.json describes, and its model class."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} at {path}: not a model directory")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if any(key in values for key in HF_ONLY_KEYS):
        raise ValueError(f"{path.parent} is in the Hugging Face transformers layout, not a megalodon model directory: "
                         f"convert it with `megalodon convert from-hf {path.parent} OUT_DIR`")
    values.pop("model_type", None)
    arch = values.pop("architecture", "megalodon")
    if arch not in architectures():
        raise ValueError(f"{path}: unknown architecture {arch!r}; expected one of {sorted(architectures())}")
    config_class, model_class = architectures()[arch]
    if hasattr(config_class, "from_dict"):
        return config_class.from_dict(values), model_class
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown {config_class.__name__} field(s) {unknown}")
    return config_class(**values), model_class


def save_pretrained(model, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in _persistent_tensors(model).items()}
    # Write both files into a temporary name first so that a crash leaves the old checkpoint whole.
    for name, write in ((WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"})),
                        (CONFIG_NAME, lambda p: write_config(model.config, p))):
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


def load_pretrained(directory: str | Path, map_location="cpu") -> nn.Module:
    """Rebuild the model a directory holds (either architecture), refusing anything that does not fit."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no model directory at {directory}")
    config, model_class = read_config(directory / CONFIG_NAME)
    tensors = read_weights(directory / WEIGHTS_NAME)
    with torch.device(map_location):
        model = model_class(config)
    load_state_strict(model, tensors, str(directory / WEIGHTS_NAME))
    return model.eval()
