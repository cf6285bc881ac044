"""Sessions: everything needed to continue one conversation later, without re-reading what came before.

A session holds the streaming state after every token so far (prompt and generated), the logits for the next
token (so that generation can go on with no new input), the generated ids (the repetition penalty's history),
the row's random generator state, and the truncate_chunks setting with its recency window. Continuing a session
with the same sampling settings gives exactly the tokens an uninterrupted run would have given.

On disk a session is one safetensors file: a valid `MegalodonState` file (so `MegalodonState.load` refuses a
model of another config) with the session's tensors and a JSON record added. The record names the model's
weight fingerprint and the tokenizer's, so a session from another checkpoint of the same config is refused too.
A SHA-256 of the record and of every tensor rides in the header: a damaged file is refused, not continued into
garbage. A session is only ever written over a session file, never over a model's file or anything else.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from megalodon.data.tokenizer import Tokenizer
from megalodon.inference.stream import RecencyWindow, check_truncate_chunks
from megalodon.precision import dtype_name
from megalodon.state import MegalodonState

SESSION_FORMAT = "megalodon-session/1"
SESSION_KEY = "megalodon_session"
CHECKSUM_KEY = "megalodon_session_sha256"
_SAMPLES_PER_TENSOR = 64


@dataclass
class Session:
    """One conversation's continuation point (a batch of one)."""

    state: MegalodonState  # after every token of the conversation
    next_logits: Tensor  # V: the model's logits for the next token
    generated_ids: list[int] = field(default_factory=list)  # all tokens generated in this conversation
    rng_state: Tensor | None = None  # the row's torch.Generator state; None until it has sampled
    seed: int | None = None  # the seed its generator started from, when known
    truncate_chunks: int | None = None
    window: RecencyWindow | None = None  # the recent tokens, when truncate_chunks is on

    @property
    def position(self) -> int:
        return int(self.state.position[0])


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of every tensor's name, shape and a strided sample of its values: cheap at any model size,
    and different for two checkpoints of one training run."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // _SAMPLES_PER_TENSOR)][:_SAMPLES_PER_TENSOR]
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.to(device="cpu", dtype=torch.float64).numpy().tobytes())
    return digest.hexdigest()[:16]


def _weights_dtype(model: nn.Module) -> torch.dtype:
    return model.embed.weight.dtype


def _checksum(record: str, tensors: dict[str, Tensor]) -> str:
    """SHA-256 of the session record and of every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(record.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensors[name].shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _session_metadata(path: Path) -> dict | None:
    """The header metadata of a safetensors file, or None when the file is not one."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError):
        return None


def check_session_target(path: str | Path) -> Path:
    """Refuse to write a session where anything but a session file is (a model's weights, say)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"the session path {path} is a directory, not a session file; a session is one "
                                f"file: give a file name, e.g. {path / 'chat.session'}")
    if path.exists() and SESSION_KEY not in (_session_metadata(path) or {}):
        owner = (f" (it belongs to the model directory {path.parent})"
                 if (path.parent / "config.json").is_file() else "")
        raise FileExistsError(f"{path} exists and is not a session file{owner}; a session never replaces "
                              "another file: choose another path, or delete that file first")
    return path


def save_session(path: str | Path, session: Session, model: nn.Module, tokenizer: Tokenizer) -> Path:
    """Write a session file atomically, replacing an older session at `path` but nothing else."""
    path = check_session_target(path)
    if session.state.batch_size != 1:
        raise ValueError(f"a session holds one conversation; this state has {session.state.batch_size} rows "
                         "(save each row, state[i], as its own session)")
    tensors = {
        "session.next_logits": session.next_logits.detach().float(),
        "session.generated_ids": torch.tensor(session.generated_ids, dtype=torch.int64),
    }
    if session.rng_state is not None:
        tensors["session.rng_state"] = session.rng_state.cpu()
    if session.window is not None:
        tensors["session.window_ids"] = session.window.ids.cpu()
    record = json.dumps({
        "format": SESSION_FORMAT, "model": model_fingerprint(model), "tokenizer": tokenizer.fingerprint(),
        "dtype": dtype_name(_weights_dtype(model)),
        "seed": session.seed, "truncate_chunks": session.truncate_chunks,
        "window_start": None if session.window is None else session.window.start,
    })
    checksum = _checksum(record, {**session.state.tensors(), **tensors})
    session.state.save(path, model.config, extra_tensors=tensors,
                       extra_metadata={SESSION_KEY: record, CHECKSUM_KEY: checksum})
    return path


def _verify(path: Path, metadata: dict, tensors: dict[str, Tensor]) -> None:
    recorded = metadata.get(CHECKSUM_KEY)
    if recorded is None:
        warnings.warn(f"{path} was written before sessions carried checksums: its integrity cannot be checked",
                      stacklevel=3)
    elif recorded != _checksum(metadata[SESSION_KEY], tensors):
        raise ValueError(f"{path} is damaged: its contents do not match the checksum recorded when it was "
                         "written (flipped bytes or an incomplete copy); write the session again")


def load_session(path: str | Path, model: nn.Module, tokenizer: Tokenizer) -> Session:
    """Read a session file, refusing a damaged one and one written by another model or tokenizer."""
    path = Path(path)
    device = next(model.parameters()).device
    state = MegalodonState.load(path, model.config, device=device)  # refuses another config by name
    metadata = _session_metadata(path) or {}
    record = metadata.get(SESSION_KEY)
    if record is None:
        raise ValueError(f"{path} is a bare MegalodonState file, not a session (write sessions with save_session)")
    tensors = load_file(str(path))
    _verify(path, metadata, tensors)
    try:
        return _session_from(path, json.loads(record), tensors, state, model, tokenizer, device)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: malformed session record ({type(err).__name__}: {err}); it was not written "
                         "by save_session, or was edited since") from None


def _session_from(path: Path, record: dict, tensors: dict[str, Tensor], state: MegalodonState, model: nn.Module,
                  tokenizer: Tokenizer, device) -> Session:
    if record.get("format") != SESSION_FORMAT:
        raise ValueError(f"{path}: unknown session format {record.get('format')!r}, expected {SESSION_FORMAT!r}")
    written_in, runs_in = record.get("dtype"), dtype_name(_weights_dtype(model))  # older sessions name none
    if written_in is not None and written_in != runs_in:
        raise ValueError(f"{path} was written by the model in {written_in}, and this one runs in {runs_in}: its "
                         f"state holds {written_in} keys and values; continue it with --dtype {written_in}")
    if record["model"] != model_fingerprint(model):
        raise ValueError(f"{path} was written by a different model (same config, other weights: fingerprint "
                         f"{record['model']} vs {model_fingerprint(model)}); its state means nothing to this one")
    if record["tokenizer"] != tokenizer.fingerprint():
        raise ValueError(f"{path} was written with a different tokenizer (fingerprint {record['tokenizer']} vs "
                         f"{tokenizer.fingerprint()})")
    truncate_chunks = record["truncate_chunks"]
    try:
        check_truncate_chunks(truncate_chunks)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    window = None
    if "session.window_ids" in tensors:
        window = RecencyWindow(truncate_chunks, model.config.chunk_size, tensors["session.window_ids"],
                               int(record["window_start"]))
    return Session(
        state=state, next_logits=tensors["session.next_logits"].to(device),
        generated_ids=tensors["session.generated_ids"].tolist(), rng_state=tensors.get("session.rng_state"),
        seed=record["seed"], truncate_chunks=truncate_chunks, window=window,
    )
