"""Training checkpoints: everything a run needs to continue exactly, written atomically and verified on load.

A checkpoint is a directory `step-NNNNNNN/` holding the model directory files, the optimizer moments, the
carried stream states, and `trainer_state.json` (step, data cursor, RNG). `manifest.json`, written last, lists
each file's size and SHA-256: a checkpoint whose files do not match it is refused. The directory is built under
a temporary name and renamed into place, so a crash never leaves a half-written checkpoint that looks whole.
Weights that are not finite are never saved, so a diverged run cannot replace a good checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megalodon.checkpoint import load_state_strict, save_pretrained
from megalodon.files import file_sha256
from megalodon.state import MegalodonState

MANIFEST = "manifest.json"
PREFIX = "step-"
NAME = re.compile(r"step-(\d+)")  # exactly: a user's `step-backup` copy is not a checkpoint


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Flatten the optimizer state into tensors (safetensors) and plain JSON."""
    state = optimizer.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def _optimizer_state(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, trainer_state: dict,
                    streams: list[MegalodonState | None], keep: int) -> Path:
    """Write checkpoints/step-NNNNNNN atomically, then drop all but the newest `keep`."""
    bad = [name for name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if bad:
        raise ValueError(f"refusing to save a checkpoint at step {step}: non-finite weights in {', '.join(bad[:3])}"
                         f"{' ...' if len(bad) > 3 else ''}; the previous checkpoints are kept")
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"{PREFIX}{step:07d}"
    if final.exists():  # this step is saved (a resumed run stopped at once): the same weights, moments and data
        return final    # position; replacing it would open a moment with no checkpoint of the step at all
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=checkpoints))
    try:
        save_pretrained(model, tmp)
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file({k: v.contiguous() for k, v in opt_tensors.items()}, str(tmp / "optimizer.safetensors"))
        stream_files = []
        for i, stream in enumerate(streams):
            if stream is not None:
                stream.save(tmp / f"stream-{i}.safetensors", model.config)
                stream_files.append(i)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {**trainer_state, "step": step, "optimizer": opt_meta, "stream_files": stream_files,
                 "num_streams": len(streams)}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        write_manifest(tmp)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_manifest(directory: Path) -> None:
    """manifest.json: the size and SHA-256 of every file under `directory` (by relative path), then sync them all,
    so that the rename that follows publishes complete files."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for path in [*files, directory / MANIFEST]:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories `step-N` of a run, oldest first (temporary ones and other names excluded)."""
    checkpoints = Path(run_dir) / "checkpoints"
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def verify_checkpoint(path: Path) -> None:
    """Raise ValueError unless every file the manifest lists is present, of the right size and hash."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"checkpoint {path} has no {MANIFEST}: it is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise ValueError(f"checkpoint {path}: {MANIFEST} is corrupt") from None
    for name, entry in manifest.items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"checkpoint {path} is missing {name}")
        if file.stat().st_size != entry["bytes"] or file_sha256(file) != entry["sha256"]:
            raise ValueError(f"checkpoint {path}: {name} does not match its recorded size/hash (truncated or "
                             "corrupted)")


def verify_latest(checkpoints: list[Path]) -> None:
    """verify_checkpoint on the newest of `checkpoints`, with an error that names the one before it."""
    try:
        verify_checkpoint(checkpoints[-1])
    except ValueError as err:
        older = f"; the previous checkpoint is {checkpoints[-2]}" if len(checkpoints) > 1 else ""
        raise ValueError(f"refusing to resume: {err}{older}. Delete the damaged checkpoint to resume from "
                         "the one before it") from None


def load_checkpoint(path: Path, model, optimizer) -> tuple[dict, list[MegalodonState | None]]:
    """Restore model, optimizer and RNG in place; return the trainer state and the carried streams."""
    verify_checkpoint(path)
    from megalodon.checkpoint import WEIGHTS_NAME, read_weights

    load_state_strict(model, read_weights(path / WEIGHTS_NAME), str(path / WEIGHTS_NAME))
    state = json.loads((path / "trainer_state.json").read_text())
    optimizer.load_state_dict(_optimizer_state(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    streams: list[MegalodonState | None] = [None] * state["num_streams"]
    for i in state["stream_files"]:
        streams[i] = MegalodonState.load(path / f"stream-{i}.safetensors", model.config)
    return state, streams
