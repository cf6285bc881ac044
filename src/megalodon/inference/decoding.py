"""Fast single-token decode: static buffers, no host syncs, CUDA graphs.

The models are mamba-ssm's `utils/generation.py` (static inference buffers, decode captured in a CUDA graph) and
gpt-fast's `generate.py` (a static KV cache written in place, torch.compile). A decode step on eager CUDA costs
about 1,500 kernel launches for mega200M; replayed from a graph it is one launch, and the GPU never waits for
Python.

`StaticDecoder` runs `model.decode_step_(ids, state)` on a static state, advancing it in place:
- Megalodon: `DecodeState` (decode_state.py), made from the MegalodonState that prefill returns;
- the Llama baseline: `StaticKVCache` (baseline/cache.py), from its KVCache or empty.
It runs eagerly on the CPU (compiled with torch.compile when asked), and on CUDA it captures the step, compiled
or not, in a torch.cuda.CUDAGraph on first use (after warm-up steps on a side stream, whose effect on the state
is undone) and replays it for every token: the ids go into a static input buffer and the logits come back in a
static output buffer.

`TokenReader` brings sampled tokens to the host without stalling the GPU: the copy is queued before the next step
and the host waits for that copy alone while the GPU computes the step.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from megalodon.baseline.cache import StaticKVCache
from megalodon.decode_state import DecodeState, check_decode_ids

WARMUP_STEPS = 2  # before a capture: lazy initializations (cuBLAS, Triton JIT, Inductor) must not be captured


class StaticDecoder:
    """Single-token decode of a batch on static buffers.

    model: a Megalodon or a Llama, in eval mode, its weights fixed while the decoder lives (Megalodon's
    parameter-derived constants are computed once, here). state: its static state (DecodeState or StaticKVCache),
    which step() advances in place; read it (e.g. `state.to_state()`) between steps.
    compile: run the step through torch.compile (Inductor, static shapes).
    cuda_graph: capture the step in a CUDA graph on the first step() and replay it; default on for CUDA states.
    """

    def __init__(self, model, state: DecodeState | StaticKVCache, *, compile: bool = False,
                 cuda_graph: bool | None = None):
        if not isinstance(state, (DecodeState, StaticKVCache)):
            raise TypeError(f"StaticDecoder needs a DecodeState or a StaticKVCache, got {type(state).__name__}")
        if model.training:
            raise ValueError("decoding needs the model in eval mode (model.eval()): dropout would make steps random")
        device = state.position.device
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the state on a CUDA device; it is on {device}")
        self.model, self.state, self.cuda_graph = model, state, cuda_graph
        self._step = torch.compile(model.decode_step_, dynamic=False) if compile else model.decode_step_
        # Megalodon's parameter-derived constants (CEMA coefficients), computed once rather than every token.
        self._constants = (model.decode_constants(),) if isinstance(state, DecodeState) else ()
        self._graph: torch.cuda.CUDAGraph | None = None
        self._ids: Tensor | None = None
        self._logits: Tensor | None = None
        # The Llama's cache has a last slot; its furthest position is tracked on the host (one read, here).
        self._limit = state.max_length if isinstance(state, StaticKVCache) else None
        self._furthest = int(state.position.max()) if self._limit is not None else 0

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    def step(self, input_ids: Tensor) -> Tensor:
        """Feed one token per row, input_ids (B,) int64 on the state's device; returns the logits (B, V).

        With a CUDA graph the logits are its static output buffer, overwritten by the next step: clone what you
        keep. Ids are range-checked only on the CPU (on a GPU that would mean a sync)."""
        check_decode_ids(input_ids, self.batch_size, self.model.config.vocab_size)
        self._check_room(1)
        self._furthest += 1
        if not self.cuda_graph:
            return self._step(input_ids, self.state, *self._constants)
        # The graph, its streams and its replay belong to the state's GPU, which need not be the current device.
        with torch.cuda.device(self.state.position.device):
            if self._graph is None:
                self._check_room(WARMUP_STEPS)  # warm-up writes these slots (then the positions are restored)
                self._capture()
            self._ids.copy_(input_ids, non_blocking=True)
            self._graph.replay()
        return self._logits

    def select(self, rows: list[int]) -> None:
        """Keep only the given rows (Megalodon): new buffers, and a new graph on the next step."""
        if not isinstance(self.state, DecodeState):
            raise TypeError("only a Megalodon DecodeState can drop rows")
        self.state = self.state.select(rows)
        self._graph = self._ids = self._logits = None

    def _check_room(self, count: int) -> None:
        if self._limit is not None and self._furthest + count > self._limit:
            raise ValueError(f"the static KV cache holds {self._limit} positions and is full: allocate it with a "
                             f"larger max_length (prompt + new tokens, + {WARMUP_STEPS} for a CUDA graph's warm-up)")

    def _capture(self) -> None:
        restore = state_restorer(self.state)
        self._ids = torch.zeros(self.batch_size, dtype=torch.int64, device=self.state.position.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step(self._ids, self.state, *self._constants)
        torch.cuda.current_stream().wait_stream(side)
        restore()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._step(self._ids, self.state, *self._constants)
        self._graph = graph


def state_restorer(state: DecodeState | StaticKVCache) -> Callable[[], None]:
    """A function that undoes what decode steps do to a state from now on (a CUDA graph's warm-up steps, or a
    benchmark's timed ones). Megalodon's is copied whole: it is small, and a step may wrap a chunk and overwrite
    a live slot. The Llama's positions alone: steps write slots at and after them, which stay masked until real
    tokens overwrite them (a copy of a long cache would not fit)."""
    if isinstance(state, StaticKVCache):
        position = state.position.clone()
        return lambda: state.position.copy_(position)
    saved = state.clone()
    return lambda: state.copy_(saved)


class TokenReader:
    """Copies a step's token ids (B,) to the host without waiting for the rest of the GPU's queue.

    start(tokens) queues the copy (into pinned memory on CUDA); get() waits for that copy only and returns a list
    of ints. Queue the next step between the two and the GPU computes it while the host reads the tokens."""

    def __init__(self):
        self._host: Tensor | None = None
        self._event: torch.cuda.Event | None = None

    def start(self, tokens: Tensor) -> None:
        if tokens.device.type != "cuda":
            self._host, self._event = tokens, None
            return
        if self._host is None or self._host.shape != tokens.shape or not self._host.is_pinned():
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        self._host.copy_(tokens, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def get(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()
