"""Decode speed at a given stream position, for Megalodon and the Llama baseline alike (benchmarks/bench_gpu.py and
benchmarks/bench_inference.py call it).

    from megalodon.inference.benchmark import measure_decode, measure_decode_variants
    result = measure_decode(model, position=2048, steps=256)        # model on its device, in its dtype, eval
    result["decode_tokens_per_s"]
    eager, compiled = measure_decode_variants(model, 2048, 256, [False, True])   # one prefill, two decoders

Both models decode the way generate() does: static buffers advanced by a StaticDecoder, a CUDA graph on CUDA,
greedy tokens fed back on the device, so the timed loop never waits for the host. Megalodon is prefilled for real
(chunk-aligned blocks): its step does not depend on the position, and the prefill shows it. The Llama is prefilled
for real up to `llama_prefill_limit` tokens; beyond that its cache is filled with random keys and values (a dense
prefill of a million tokens is out of reach, and a step's cost depends on the cache's length, not its contents),
and prefill_tokens_per_s is NaN.
"""

from __future__ import annotations

import math
import time

import torch

from megalodon.baseline import Llama
from megalodon.decode_state import DecodeState
from megalodon.inference.decoding import WARMUP_STEPS, StaticDecoder, state_restorer
from megalodon.inference.stream import chunk_aligned_blocks, default_block_tokens
from megalodon.model import Megalodon

LLAMA_PREFILL_LIMIT = 32768  # beyond this the Llama's cache is filled synthetically
CACHE_MULTIPLE = 64  # the Llama's cache length is rounded up to this (aligned attention masks)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_decode(model, position: int, steps: int, *, batch_size: int = 1, warmup: int = 5,
                   compile: bool = False, cuda_graph: bool | None = None, seed: int = 0,
                   llama_prefill_limit: int = LLAMA_PREFILL_LIMIT) -> dict:
    """Prefill `position` random tokens per row, then time `steps` greedy decode steps (after `warmup` untimed
    ones, which include the CUDA graph capture and any compilation).

    model: a Megalodon or a Llama, already on its device and in its dtype. Returns decode_tokens_per_s (all rows'
    tokens), ms_per_step, prefill_tokens_per_s (NaN when synthetic), state_bytes (the state or KV cache that a step
    reads), tokens (per row, the ids decoded in the timed steps), and the settings."""
    return measure_decode_variants(model, position, steps, [compile], batch_size=batch_size, warmup=warmup,
                                   cuda_graph=cuda_graph, seed=seed, llama_prefill_limit=llama_prefill_limit)[0]


@torch.no_grad()
def measure_decode_variants(model, position: int, steps: int, compile_variants: list[bool], *,
                            batch_size: int = 1, warmup: int = 5, cuda_graph: bool | None = None, seed: int = 0,
                            llama_prefill_limit: int = LLAMA_PREFILL_LIMIT) -> list[dict]:
    """measure_decode once per entry of compile_variants (e.g. [False, True]: eager steps, then compiled ones),
    all from one prefill: each variant decodes from the same prefilled state (restored after it), so a long
    prefill is paid once. Returns one result per variant, in order."""
    if not isinstance(model, (Megalodon, Llama)):
        raise TypeError(f"measure_decode takes a Megalodon or a Llama, got {type(model).__name__}")
    for name, value, low in (("position", position, 1), ("steps", steps, 1), ("batch_size", batch_size, 1),
                             ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not compile_variants or not all(isinstance(c, bool) for c in compile_variants):
        raise ValueError(f"compile_variants must be a non-empty list of bools, got {compile_variants!r}")
    model.eval()
    device = next(model.parameters()).device
    start = time.perf_counter()
    logits, state, prefilled = prefill_for_decode(model, position, warmup + steps, batch_size=batch_size, seed=seed,
                                                  llama_prefill_limit=llama_prefill_limit)
    _sync(device)
    prefill_seconds = time.perf_counter() - start
    restore = state_restorer(state)
    results = []
    for compile in compile_variants:
        decoder = StaticDecoder(model, state, compile=compile, cuda_graph=cuda_graph)
        token = logits.argmax(-1)
        for _ in range(warmup):
            token = decoder.step(token).argmax(-1)
        _sync(device)
        timed = []  # references only: no work added to the timed loop
        start = time.perf_counter()
        for _ in range(steps):
            token = decoder.step(token).argmax(-1)
            timed.append(token)
        _sync(device)
        seconds = time.perf_counter() - start
        restore()
        results.append({
            "decode_tokens_per_s": steps * batch_size / seconds, "ms_per_step": 1000 * seconds / steps,
            "prefill_tokens_per_s": position * batch_size / prefill_seconds if prefilled else math.nan,
            "state_bytes": state.nbytes, "position": position, "batch_size": batch_size, "steps": steps,
            "compile": compile, "cuda_graph": decoder.cuda_graph, "device": str(device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "tokens": torch.stack(timed, dim=1).tolist(),  # per row, the greedy ids of the timed steps
        })
        del decoder  # its CUDA graph's memory pool goes before the next variant captures
    return results


@torch.no_grad()
def prefill_for_decode(model, position: int, steps: int, *, batch_size: int = 1, seed: int = 0,
                       llama_prefill_limit: int = LLAMA_PREFILL_LIMIT):
    """`position` random tokens per row through the model (a Megalodon or a Llama, on its device, in eval mode):
    (the last position's logits (B, V), the static decode state with room for `steps` more tokens, whether the
    prefill was real). Beyond llama_prefill_limit the Llama's cache is filled with random keys and values."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    if isinstance(model, Megalodon):
        return _prefill_megalodon(model, position, batch_size, generator)
    return _prefill_llama(model, position, batch_size, steps, generator, llama_prefill_limit)


def _random_ids(model, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator, device=generator.device)


def _prefill_megalodon(model: Megalodon, position: int, batch: int, generator: torch.Generator):
    state, logits = None, None
    blocks = default_block_tokens(model.config.chunk_size, prefill_device=generator.device)
    for begin, end in chunk_aligned_blocks(0, position, blocks):
        out, state = model(_random_ids(model, batch, end - begin, generator), state=state, return_state=True,
                           logits_to_keep=1)
        logits = out[:, -1]
    return logits, DecodeState.from_state(state, model.config), True


def _prefill_llama(model: Llama, position: int, batch: int, more: int, generator: torch.Generator, limit: int):
    room = position + more + WARMUP_STEPS + 1
    max_length = -(-room // CACHE_MULTIPLE) * CACHE_MULTIPLE
    if position <= limit:
        logits, past = model(_random_ids(model, batch, position, generator), return_past=True)
        return logits[:, -1], model.static_cache(batch, max_length, past), True
    cache = model.static_cache(batch, max_length)
    for buffer in cache.keys + cache.values:
        buffer[:, :position].normal_(generator=generator)
    cache.position.fill_(position)
    logits = torch.zeros(batch, model.config.vocab_size, device=cache.position.device)
    return logits, cache, False
