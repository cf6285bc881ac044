"""Sessions: everything needed to continue one conversation later, without re-reading what came before.

A session holds the streaming state after every token so far (prompt and generated), the logits for the next
token (so that generation can go on with no new input), the generated ids (the repetition penalty's history),
the row's random generator state, and the truncate_chunks setting with its recency window. Continuing a session
with the same sampling settings gives exactly the tokens an uninterrupted run would have given.

On disk a session is one safetensors file: a valid `MegalodonState` file (so `MegalodonState.load` refuses a
model of another config) with the session's tensors and a JSON record added. The record names the model's
weight fingerprint and the tokenizer's, so a session from another checkpoint of the same config is refused too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from megalodon.data.tokenizer import Tokenizer
from megalodon.inference.stream import RecencyWindow, check_truncate_chunks
from megalodon.state import MegalodonState

SESSION_FORMAT = "megalodon-session/1"
SESSION_KEY = "megalodon_session"
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


def save_session(path: str | Path, session: Session, model: nn.Module, tokenizer: Tokenizer) -> Path:
    """Write a session file atomically."""
    path = Path(path)
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
        "seed": session.seed, "truncate_chunks": session.truncate_chunks,
        "window_start": None if session.window is None else session.window.start,
    })
    session.state.save(path, model.config, extra_tensors=tensors, extra_metadata={SESSION_KEY: record})
    return path


def load_session(path: str | Path, model: nn.Module, tokenizer: Tokenizer) -> Session:
    """Read a session file, refusing one written by another model or tokenizer."""
    path = Path(path)
    device = next(model.parameters()).device
    state = MegalodonState.load(path, model.config, device=device)  # refuses another config by name
    with safe_open(str(path), framework="pt") as handle:
        record = (handle.metadata() or {}).get(SESSION_KEY)
    if record is None:
        raise ValueError(f"{path} is a bare MegalodonState file, not a session (write sessions with save_session)")
    record = json.loads(record)
    if record.get("format") != SESSION_FORMAT:
        raise ValueError(f"{path}: unknown session format {record.get('format')!r}, expected {SESSION_FORMAT!r}")
    if record["model"] != model_fingerprint(model):
        raise ValueError(f"{path} was written by a different model (same config, other weights: fingerprint "
                         f"{record['model']} vs {model_fingerprint(model)}); its state means nothing to this one")
    if record["tokenizer"] != tokenizer.fingerprint():
        raise ValueError(f"{path} was written with a different tokenizer (fingerprint {record['tokenizer']} vs "
                         f"{tokenizer.fingerprint()})")
    tensors = load_file(str(path))
    truncate_chunks = record["truncate_chunks"]
    check_truncate_chunks(truncate_chunks)
    window = None
    if "session.window_ids" in tensors:
        window = RecencyWindow(truncate_chunks, model.config.chunk_size, tensors["session.window_ids"],
                               int(record["window_start"]))
    return Session(
        state=state, next_logits=tensors["session.next_logits"].to(device),
        generated_ids=tensors["session.generated_ids"].tolist(), rng_state=tensors.get("session.rng_state"),
        seed=record["seed"], truncate_chunks=truncate_chunks, window=window,
    )
