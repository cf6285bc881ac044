"""Sharded training checkpoints for runs on several ranks (torch.distributed.checkpoint), with the promises of
the single-process ones (training/checkpoint.py): built under a temporary name and renamed into place, a manifest
of every file's size and SHA-256 written last, refused when damaged.

    step-NNNNNNN/
        dcp/                 the model and optimizer, one file per rank (keys are the plain model's names, so the
                             checkpoint loads at any number of ranks, under FSDP, DDP or in one process)
        config.json          the model's config
        streams.safetensors  the carried state of every row of the global batch, in row order (stateful runs)
        rng.safetensors, trainer_state.json, manifest.json

Every rank writes its own shard of `dcp/`; rank 0 writes the rest and renames. The model directory a run ends
with is always consolidated (model.safetensors); `consolidate` turns any sharded checkpoint into one too, and
`megalodon.checkpoint.load_pretrained` reads a sharded checkpoint directly (generate, eval and convert take it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from megalodon.checkpoint import CONFIG_NAME, read_config, write_config
from megalodon.state import MegalodonState
from megalodon.training.checkpoint import PREFIX, list_checkpoints, load_checkpoint, verify_checkpoint, \
    write_manifest
from megalodon.training.run_dir import TEMP_MARK

SHARDS = "dcp"
STREAMS = "streams.safetensors"


def is_sharded(path: Path) -> bool:
    return (Path(path) / SHARDS / ".metadata").is_file()


def _local_finite(model) -> bool:
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if not torch.isfinite(local).all():
            return False
    return True


def save_sharded(run_dir: Path, step: int, model, optimizer, trainer_state: dict, streams: MegalodonState | None,
                 keep: int, ranks, tokenizer=None) -> Path:
    """Collective: every rank calls it. `streams` (rank 0's argument counts) holds every row's carried state.
    With the tokenizer saved beside it, the checkpoint is a model directory that generate and eval take."""
    ranks.agree(_local_finite(model), f"refusing to save a checkpoint at step {step}: non-finite weights; the "
                                      "previous checkpoints are kept")
    checkpoints = run_dir / "checkpoints"
    final = checkpoints / f"{PREFIX}{step:07d}"

    def begin() -> str | None:
        if final.exists():  # this step is saved already (see save_checkpoint)
            return None
        checkpoints.mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(prefix=f".{final.name}{TEMP_MARK}", dir=checkpoints)

    tmp = ranks.on_main(begin)
    if tmp is None:
        return final
    tmp = Path(tmp)
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, storage_writer=dcp.FileSystemWriter(tmp / SHARDS))
        ranks.barrier()  # every shard is on disk before rank 0 lists and hashes them
        ranks.on_main(lambda: _finish(tmp, final, model, trainer_state, streams, step, ranks.world, tokenizer))
    finally:
        if ranks.main:
            shutil.rmtree(tmp, ignore_errors=True)
    if ranks.main:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _finish(tmp: Path, final: Path, model, trainer_state: dict, streams, step: int, world: int,
            tokenizer) -> None:
    write_config(model.config, tmp / CONFIG_NAME)
    if tokenizer is not None:
        tokenizer.save(tmp)
    if streams is not None:
        streams.save(tmp / STREAMS, model.config)
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    state = {**trainer_state, "step": step, "format": "sharded", "ranks": world, "streams": streams is not None}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    write_manifest(tmp)
    tmp.rename(final)


def load_any(path: Path, model, optimizer, several_ranks: bool) -> tuple[dict, MegalodonState | None]:
    """A checkpoint of either kind (sharded, or written by one process) into this run, on several ranks or in one;
    returns the trainer state and every row's carried state (None when the checkpoint has none)."""
    if is_sharded(path):
        return load_sharded(path, model, optimizer)
    if several_ranks:
        return load_single_process(path, model, optimizer)
    saved, parts = load_checkpoint(path, model, optimizer)
    return saved, MegalodonState.stack(parts) if parts and all(p is not None for p in parts) else None


def load_sharded(path: Path, model, optimizer) -> tuple[dict, MegalodonState | None]:
    """Restore model, optimizer and RNG in place, at any number of ranks (collective when a process group is up);
    return the trainer state and every row's carried state. Verify the manifest first (verify_checkpoint)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # resuming in one process: the note that it is one process is noise
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=path / SHARDS,
                 no_dist=not torch.distributed.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    state = json.loads((path / "trainer_state.json").read_text())
    streams = MegalodonState.load(path / STREAMS, _plain(model).config) if state["streams"] else None
    return state, streams


def load_single_process(path: Path, model, optimizer) -> tuple[dict, MegalodonState | None]:
    """Restore a checkpoint of a run in one process (training/checkpoint.py) into a model and optimizer on several
    ranks: every rank reads the whole files and keeps its shard. Returns the trainer state and every row's state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from megalodon.checkpoint import WEIGHTS_NAME, read_weights
    from megalodon.training.checkpoint import _optimizer_state

    state = json.loads((path / "trainer_state.json").read_text())
    saved = _optimizer_state(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    names = {id(p): name for name, p in _plain(model).named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]  # saved state's indices
    by_name = {"state": {order[i]: slots for i, slots in saved["state"].items()},
               "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=read_weights(path / WEIGHTS_NAME), optim_state_dict=by_name,
                   options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    parts = [MegalodonState.load(path / f"stream-{i}.safetensors", _plain(model).config) for i in state["stream_files"]]
    streams = MegalodonState.stack(parts) if parts and len(parts) == state["num_streams"] else None
    return state, streams


def _plain(model):
    return getattr(model, "module", model)


def load_sharded_model(path: str | Path) -> torch.nn.Module:
    """The model of a sharded checkpoint, whole, read in this process (no process group needed)."""
    path = Path(path)
    verify_checkpoint(path)
    config, model_class = read_config(path / CONFIG_NAME)
    model = model_class(config)
    tensors = model.state_dict()
    with warnings.catch_warnings():  # the note that this is one process: it is meant to be
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": tensors}, storage_reader=dcp.FileSystemReader(path / SHARDS), no_dist=True)
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path}: non-finite weights in {', '.join(bad[:3])}")
    return model


def consolidate(path: str | Path, out: str | Path) -> None:
    """Write a sharded checkpoint's model and tokenizer as a model directory (config.json, model.safetensors,
    checksums, tokenizer): `megalodon convert consolidate CHECKPOINT OUT`."""
    from megalodon.checkpoint import save_pretrained
    from megalodon.data import load_tokenizer

    path = Path(path)
    if not is_sharded(path):
        raise ValueError(f"{path} is not a sharded checkpoint (no {SHARDS}/.metadata); a checkpoint of a run in one "
                         "process is a model directory already")
    save_pretrained(load_sharded_model(path), out)
    if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        load_tokenizer(path).save(Path(out))
