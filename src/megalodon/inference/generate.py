"""Text generation with Megalodon: vectorized prefill, batched single-token decode, streaming, sessions.

Prompts of different lengths (spec section 16). Megalodon's chunk grid starts at each stream's first token, so
rows of different lengths sit at different in-chunk positions; padding would shift that grid and change the
result. So there is no padding at all:
- prefill: each prompt is fed alone, in chunk-aligned blocks of chunk_size tokens (vectorized calls; the state
  carries across blocks, which is exact by split invariance and bounds activation memory);
- the per-row states are stacked with `MegalodonState.stack`: count, mean and var are per row, the CEMA state is
  per row, and each row keeps its own in-chunk fill in a right-padded key cache;
- decode: the stacked state goes into static buffers (decode_state.DecodeState) and a StaticDecoder
  (decoding.py) advances the whole batch one token per step, each row at its own in-chunk position; on CUDA the
  step is a CUDA graph replay. Sampling runs on the device (the generators' numbers are drawn up front), and
  each step's tokens reach the host while the GPU computes the next step (TokenReader): nothing in the loop
  waits for the GPU except that small copy.
A row that stops (end-of-sequence, a stop string, or max_new_tokens) has its state and next-token logits
copied right after its last token has been fed, so its state covers every one of its tokens; it then rides
along unused until the dead rows are as many as the live ones, when the batch is compacted (so a graph is
recaptured, or a compiled step recompiled, at most log2(batch) times). Each row therefore gets exactly the
tokens it gets alone (greedy), up to float rounding in the batched attention.

Each result carries a `Session`: the state, the logits for the next token and the sampling history, to continue
the conversation later (see session.py).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import secrets
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from megalodon.data.tokenizer import Tokenizer
from megalodon.decode_state import DecodeState
from megalodon.inference.decoding import StaticDecoder, TokenReader
from megalodon.inference.sampling import SamplingConfig, sample_next
from megalodon.inference.session import Session
from megalodon.inference.stream import RecencyWindow, check_truncate_chunks, final_logits_and_state
from megalodon.inference.text_stream import TextTracker
from megalodon.model import Megalodon
from megalodon.state import MegalodonState

TokenCallback = Callable[[int, int, str], None]  # (row, token id, newly printable text)
PrefillProgress = Callable[[int, int, int], None]  # (row, prompt tokens read, prompt tokens)


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    ids: list[int]  # generated tokens, including the end-of-sequence token or the one completing a stop string
    text: str  # their text, cut before the stop string
    finish_reason: str  # "eos", "stop_string", "length" or "interrupted" (should_stop)
    session: Session  # continue from here: state after prompt_ids + ids, and the next token's logits

    @property
    def state(self) -> MegalodonState:
        return self.session.state


@dataclass
class _Row:
    """One prompt's progress through generate()."""

    prompt_ids: list[int]
    session: Session | None  # where it starts; None for a fresh stream
    generator: torch.Generator
    seed: int | None
    window: RecencyWindow | None
    tracker: TextTracker
    new_ids: list[int]
    finish_reason: str | None = None


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module):
    """No autograd and no dropout for the duration; the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def encode_prompts(tokenizer: Tokenizer, prompts, vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt (text or ids), checked against the model's vocabulary."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists "
                         f"(wrap a single prompt in a list), got {type(prompts).__name__}")
    encoded = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        encoded.append([_token_id(token, i, vocab_size) for token in ids])
    return encoded


def _token_id(token, prompt_index: int, vocab_size: int) -> int:
    try:
        if isinstance(token, bool):
            raise TypeError
        value = operator.index(token)  # ints, numpy integers, integer tensors of one element
    except TypeError:
        raise ValueError(f"prompt {prompt_index}: token ids must be integers, got {token!r}") from None
    if not 0 <= value < vocab_size:
        raise ValueError(f"prompt {prompt_index}: token id {value} is out of range for the model's "
                         f"vocab_size={vocab_size}")
    return value


def _check_model(model, tokenizer: Tokenizer) -> None:
    if not isinstance(model, Megalodon):
        raise ValueError(f"generation needs a Megalodon model, got {type(model).__name__}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}: they do not belong together")
    if model.config.num_outputs != model.config.vocab_size:
        raise ValueError(f"the model predicts {model.config.num_outputs} outputs over a vocabulary of "
                         f"{model.config.vocab_size}: generation feeds its predictions back, so they must agree")


def _start_rows(model, tokenizer, prompt_ids, sampling, state, sessions, truncate_chunks) -> list[_Row]:
    if state is not None and sessions is not None:
        raise ValueError("give either state or sessions, not both")
    if state is not None and state.batch_size != len(prompt_ids):
        raise ValueError(f"state has {state.batch_size} rows but there are {len(prompt_ids)} prompts")
    if sessions is not None and len(sessions) != len(prompt_ids):
        raise ValueError(f"{len(sessions)} sessions for {len(prompt_ids)} prompts: give one session per prompt")
    base_seed = sampling.seed if sampling.seed is not None else secrets.randbits(31)
    chunk = model.config.chunk_size
    rows = []
    for b, ids in enumerate(prompt_ids):
        session = None if sessions is None else sessions[b]
        if state is not None:
            session = Session(state[b], next_logits=None)
        if session is None and not ids:
            raise ValueError(f"prompt {b} is empty: give at least one token (or continue a session)")
        if session is not None and session.next_logits is None and not ids:
            raise ValueError(f"prompt {b} is empty and its state has no next-token logits: give it some text")
        generator, seed = torch.Generator(), base_seed + b
        if session is not None and session.rng_state is not None:
            generator.set_state(session.rng_state)
            seed = session.seed
        else:
            generator.manual_seed(seed)
        chunks = truncate_chunks if truncate_chunks is not None else getattr(session, "truncate_chunks", None)
        check_truncate_chunks(chunks)
        window = None
        if chunks is not None:
            saved = None if session is None else session.window
            if saved is not None:  # a copy: the window advances, the session passed in must not
                window = RecencyWindow(chunks, chunk, saved.ids.clone(), saved.start)
            else:
                window = RecencyWindow.empty(chunks, chunk, 0 if session is None else session.position)
        rows.append(_Row(ids, session, generator, seed, window, TextTracker(tokenizer, sampling.stop_strings), []))
    return rows


def _prefill(model, row: _Row, block_tokens: int | None, progress: Callable[[int, int], None] | None = None,
             ) -> tuple[Tensor, MegalodonState]:
    """The next-token logits (V,) and the state after the row's prompt (continuing its session if any)."""
    if not row.prompt_ids:
        return row.session.next_logits, row.session.state
    device = next(model.parameters()).device
    ids = torch.tensor(row.prompt_ids, dtype=torch.int64, device=device)
    start_state = None if row.session is None else row.session.state
    return final_logits_and_state(model, ids, start_state, row.window, block_tokens, progress)


def generate(
    model: Megalodon, tokenizer: Tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]],
    sampling: SamplingConfig | None = None, *, state: MegalodonState | None = None,
    sessions: Sequence[Session] | None = None, on_token: TokenCallback | None = None,
    prefill_progress: PrefillProgress | None = None, should_stop: Callable[[], bool] | None = None,
    truncate_chunks: int | None = None, prefill_chunks: int | None = None, compile: bool = False,
) -> list[GenerationResult]:
    """Generate a continuation of every prompt, batched.

    state: a stream to continue, one row per prompt (e.g. after reading a book); prompts must then be non-empty.
    sessions: saved conversations to continue, one per prompt; a prompt may then be empty ("go on").
    on_token(row, token_id, text): called for every generated token with the text that became printable.
    prefill_progress(row, read, total): called after each prefill block (a progress bar, say).
    should_stop(): asked before each decode step; once it says True, every row stops after one more token
    with finish_reason "interrupted", its session complete (the CLI's Ctrl-C).
    truncate_chunks: None (off), or see stream.py; a session's own setting applies when this is None.
    prefill_chunks: prefill block size in chunks (default: about 4096 tokens, 32768 on CUDA, or 2 chunks with
    truncate_chunks, whose reruns fire after blocks); activation memory grows with it.
    compile: run the decode step through torch.compile (worth it for long generations: it compiles first).
    On CUDA the decode step is captured in a CUDA graph either way.
    """
    sampling = sampling or SamplingConfig()
    _check_model(model, tokenizer)
    prompt_ids = encode_prompts(tokenizer, prompts, model.config.vocab_size)
    rows = _start_rows(model, tokenizer, prompt_ids, sampling, state, sessions, truncate_chunks)
    block_tokens = None if prefill_chunks is None else prefill_chunks * model.config.chunk_size
    with evaluation_mode(model):
        prefilled = [_prefill(model, row, block_tokens,
                              None if prefill_progress is None else functools.partial(prefill_progress, b))
                     for b, row in enumerate(rows)]
        batch_state = MegalodonState.stack([s for _, s in prefilled])
        logits = torch.stack([lg for lg, _ in prefilled])  # B x V
        decoder = StaticDecoder(model, DecodeState.from_state(batch_state, model.config), compile=compile)
        ends = _decode(model, decoder, tokenizer, rows, sampling, logits, on_token, block_tokens, should_stop)
    return [_result(row, *ends[b]) for b, row in enumerate(rows)]


def _decode(model, decoder: StaticDecoder, tokenizer, rows: list[_Row], sampling: SamplingConfig, logits: Tensor,
            on_token: TokenCallback | None, block_tokens: int | None,
            should_stop: Callable[[], bool] | None = None) -> dict[int, tuple[MegalodonState, Tensor]]:
    """Batched single-token decode until every row stops; returns each row's final (state, next logits)."""
    slots: list[int | None] = list(range(len(rows)))  # batch position -> row index; None once the row stopped
    history = _history_buffer(rows, sampling, logits.device)  # B x T, -1 = empty; only order-free use
    uniforms, rng_starts = _draw_uniforms(rows, sampling, logits.device)
    reader = TokenReader()
    ends = {}
    for step in range(sampling.max_new_tokens):
        tokens = sample_next(logits, history, sampling, None, None if uniforms is None else uniforms[:, step])
        if history.shape[1]:
            history[:, history.shape[1] - sampling.max_new_tokens + step] = tokens
        reader.start(tokens)
        # Every row feeds its new token, finished ones too, so their state covers all of their tokens.
        logits = decoder.step(tokens)
        host_tokens = reader.get()  # waits for the copy only: the GPU is busy with the step meanwhile
        stopping = should_stop is not None and should_stop()
        last_step = stopping or step == sampling.max_new_tokens - 1
        finished = []
        for pos, i in enumerate(slots):
            if i is None:
                continue
            row, token = rows[i], host_tokens[pos]
            row.new_ids.append(token)
            is_eos = sampling.stop_on_eos and token == tokenizer.eos_id
            text = row.tracker.push(token, final=is_eos or last_step)
            if row.tracker.stop_at is not None:
                row.finish_reason = "stop_string"
            elif is_eos:
                row.finish_reason = "eos"
            elif last_step:
                row.finish_reason = "interrupted" if stopping else "length"
            if on_token is not None:
                on_token(i, token, text)
            if row.finish_reason:
                finished.append(pos)
            _maybe_truncate(model, decoder, pos, row, token, block_tokens)
        for pos in finished:
            ends[slots[pos]] = (decoder.state.select([pos]).to_state(), logits[pos].clone())
            slots[pos] = None
        live = [pos for pos, i in enumerate(slots) if i is not None]
        if not live:
            break
        if 2 * len(live) <= len(slots):  # as many dead rows as live ones: compact the batch
            decoder.select(live)
            index = torch.tensor(live, device=logits.device)
            logits, history = logits[index], history[index]
            uniforms = None if uniforms is None else uniforms[index]
            slots = [slots[pos] for pos in live]
    _rewind_generators(rows, rng_starts)
    return ends


def _draw_uniforms(rows: list[_Row], sampling: SamplingConfig, device) -> tuple[Tensor | None, list]:
    """Each row's random numbers for the whole generation, drawn up front exactly as sample_next would draw them
    one token at a time (B x max_new_tokens float64, on the device), so that no copy to the GPU happens per token;
    and each generator's state before, for _rewind_generators. None when greedy: nothing is drawn."""
    if sampling.greedy:
        return None, []
    starts = [row.generator.get_state() for row in rows]
    uniforms = torch.tensor([[float(torch.rand((), generator=row.generator, dtype=torch.float64))
                              for _ in range(sampling.max_new_tokens)] for row in rows], dtype=torch.float64)
    return uniforms.to(device), starts


def _rewind_generators(rows: list[_Row], starts: list) -> None:
    """Leave each generator where drawing one number per generated token would have left it, so that a session
    continues the same random stream."""
    for row, start in zip(rows, starts):
        row.generator.set_state(start)
        for _ in row.new_ids:
            torch.rand((), generator=row.generator, dtype=torch.float64)


def _history_buffer(rows: list[_Row], sampling: SamplingConfig, device) -> Tensor:
    """The tokens each row generated before (its session's) and room for the new ones; empty when the
    repetition penalty is off, since nothing else reads it."""
    if sampling.repetition_penalty == 1.0:
        return torch.zeros(len(rows), 0, dtype=torch.int64, device=device)
    previous = [row.session.generated_ids if row.session else [] for row in rows]
    width = max(len(p) for p in previous)
    history = torch.full((len(rows), width + sampling.max_new_tokens), -1, dtype=torch.int64)
    for b, ids in enumerate(previous):
        history[b, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return history.to(device)


def _maybe_truncate(model, decoder: StaticDecoder, pos: int, row: _Row, token: int,
                    block_tokens: int | None) -> None:
    """truncate_chunks (stream.py): when the row's recency window is due, replace its norm statistics in the
    decoder's buffers, in place, by those of a fresh run over the window's span."""
    if row.window is None:
        return
    row.window.extend(torch.tensor([token]))
    if row.window.due():
        span = row.window.rerun_span().to(decoder.state.device)
        _, fresh = final_logits_and_state(model, span, block_tokens=block_tokens)
        decoder.state.replace_norm_stats_(pos, fresh)


def _result(row: _Row, state: MegalodonState, next_logits: Tensor) -> GenerationResult:
    previous = row.session.generated_ids if row.session else []
    chunks = None if row.window is None else row.window.truncate_chunks
    session = Session(state, next_logits, previous + row.new_ids, row.generator.get_state(), row.seed, chunks,
                      row.window)
    return GenerationResult(row.prompt_ids, row.new_ids, row.tracker.text, row.finish_reason, session)


def prefill_session(
    model: Megalodon, tokenizer: Tokenizer, prompt: str | Sequence[int], session: Session | None = None,
    truncate_chunks: int | None = None, progress: Callable[[int, int], None] | None = None,
) -> Session:
    """Read a prompt (a book, say) into a session without generating anything."""
    _check_model(model, tokenizer)
    ids = encode_prompts(tokenizer, [prompt], model.config.vocab_size)
    rows = _start_rows(model, tokenizer, ids, SamplingConfig(), None, None if session is None else [session],
                       truncate_chunks)
    row = rows[0]
    if not row.prompt_ids:
        raise ValueError("the prompt is empty: nothing to read")
    with evaluation_mode(model):
        logits, state = _prefill(model, row, None, progress)
    previous = [] if session is None else session.generated_ids
    rng = None if session is None else session.rng_state
    chunks = None if row.window is None else row.window.truncate_chunks
    return Session(state, logits, list(previous), rng, None if session is None else session.seed, chunks,
                   row.window)
