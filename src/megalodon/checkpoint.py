"""Model directories on disk: `config.json` + `model.safetensors`, written atomically and loaded strictly.

One format serves both architectures of the project: `config.json` names its `architecture` ("megalodon" or
"llama", the matched baseline) beside the config's fields. `checksums.json`, written last, records the size and
SHA-256 of both files: a directory whose files do not match it (flipped bits, a partial copy, an interrupted
save, a hand edit) is refused on load. A directory from before checksums loads with a note. Weights that are
not finite are neither saved nor loaded.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from megalodon.files import file_sha256, replace_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKSUMS_NAME = "checksums.json"
CHECKSUMS_FORMAT = "megalodon-checksums/1"
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
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of config fields, found a {type(values).__name__}")
    if any(key in values for key in HF_ONLY_KEYS):
        raise ValueError(f"{path.parent} is in the Hugging Face transformers layout, not a megalodon model directory: "
                         f"convert it with `megalodon convert from-hf {path.parent} OUT_DIR`")
    values.pop("model_type", None)
    arch = values.pop("architecture", "megalodon")
    if arch not in architectures():
        raise ValueError(f"{path}: unknown architecture {arch!r}; expected one of {sorted(architectures())}")
    config_class, model_class = architectures()[arch]
    try:
        if hasattr(config_class, "from_dict"):
            return config_class.from_dict(values), model_class
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(config_class)})
        if unknown:
            raise ValueError(f"unknown {config_class.__name__} field(s) {unknown}")
        return config_class(**values), model_class
    except (TypeError, ValueError) as err:  # the config's own validation: name the file it came from
        raise ValueError(f"{path}: {err}") from None


def non_finite_tensors(tensors: dict[str, Tensor]) -> list[str]:
    return [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def _refuse_non_finite(tensors: dict[str, Tensor], what: str) -> None:
    bad = non_finite_tensors(tensors)
    if bad:
        raise ValueError(f"{what}: non-finite values (NaN or inf) in {', '.join(bad[:3])}"
                         f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}; the model diverged or the file "
                         "is damaged: use an earlier checkpoint")


def save_pretrained(model, directory: str | Path) -> None:
    """Write config.json and model.safetensors (each atomically), then checksums.json, which vouches for both."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot save a model directory at {directory}: it is a file")
    tensors = {k: v.detach().contiguous().cpu() for k, v in _persistent_tensors(model).items()}
    _refuse_non_finite(tensors, f"refusing to save {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    replace_file(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    replace_file(directory / CONFIG_NAME, lambda p: write_config(model.config, p))
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
             for name in (CONFIG_NAME, WEIGHTS_NAME)}
    record = json.dumps({"format": CHECKSUMS_FORMAT, "files": files}, indent=2) + "\n"
    replace_file(directory / CHECKSUMS_NAME, lambda p: Path(p).write_text(record))


def verify_directory(directory: str | Path) -> bool:
    """Raise ValueError unless every file checksums.json lists matches its size and SHA-256. False when there is
    no checksums.json (a directory saved before they existed): nothing could be checked."""
    directory = Path(directory)
    path = directory / CHECKSUMS_NAME
    if not path.is_file():
        return False
    try:
        entries = json.loads(path.read_text())["files"]
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is malformed ({type(err).__name__}: {err}); restore the model directory from "
                         f"a good copy, or delete {CHECKSUMS_NAME} to load it unchecked") from None
    for name, (size, sha256) in sorted(expected.items()):
        file = directory / name
        if not file.is_file():
            continue  # loading names the missing file
        if file.stat().st_size != size or file_sha256(file) != sha256:
            raise ValueError(f"{file} does not match the checksum recorded when the model was saved (damaged, "
                             "partly copied, edited, or its save was interrupted); restore it from a good copy")
    return True


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


def load_pretrained(directory: str | Path, map_location="cpu", verify: bool = True) -> nn.Module:
    """Rebuild the model a directory holds (either architecture), refusing anything that does not fit.

    verify: check the files against checksums.json first (reads the weights twice; about 1 s per GB)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no model directory at {directory}")
    if not (directory / WEIGHTS_NAME).is_file() and (directory / "dcp" / ".metadata").is_file():
        from megalodon.training.dist_checkpoint import load_sharded_model  # a checkpoint of a run on several ranks

        return load_sharded_model(directory).to(map_location).eval()
    verified = verify_directory(directory) if verify else True
    config, model_class = read_config(directory / CONFIG_NAME)
    tensors = _finite_weights(directory, verified)
    with torch.device(map_location):
        model = model_class(config)
    load_state_strict(model, tensors, str(directory / WEIGHTS_NAME))
    return model.eval()


def verified_weights(directory: str | Path) -> dict[str, Tensor]:
    """A model directory's weights, checked against its checksums and for non-finite values: what a run that
    starts from a trained model (TrainConfig.init_from) loads with load_state_strict."""
    directory = Path(directory)
    return _finite_weights(directory, verify_directory(directory))


def _finite_weights(directory: Path, verified: bool) -> dict[str, Tensor]:
    if not verified and (directory / WEIGHTS_NAME).is_file():
        warnings.warn(f"{directory} has no checksums ({CHECKSUMS_NAME}; saved by an older version): its files "
                      "cannot be verified. Save it again to add them", stacklevel=3)
    tensors = read_weights(directory / WEIGHTS_NAME)
    _refuse_non_finite(tensors, str(directory / WEIGHTS_NAME))
    return tensors
