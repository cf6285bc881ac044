"""Long-document evaluation at constant memory: perplexity, bits per byte and loss by position.

Each document is streamed through the model in blocks (Megalodon carries its state; the baseline carries its KV
cache), so memory is bounded by a block whatever the document's length. Per-token losses are summed in float64
and never stored: totals and per-position-bucket sums are all that is kept.

Conventions (the same as the token store's):
- a document is its tokens followed by end-of-sequence; its first token is never predicted, every later one is;
- bits per byte divide the summed loss (in bits) by the UTF-8 bytes of the documents' text;
- the loss of the token at document position t (0-based) counts in the bucket [a, b) with a <= t < b; the default
  edges are 0, 1024, 2048, 4096, ... doubling up to the longest document.

The Llama baseline has no constant-memory state, so it is evaluated with a sliding window: `window=W` attends to
the last W tokens (its own included). `max_context=N` is the memory cap used when no window is given, and it is
the same thing: full attention for the first N tokens of a document (exactly, since nothing is dropped yet),
then a sliding window of N tokens. We chose this over reporting the rest as truncated so that the baseline's
curve covers every position, like Megalodon's; the report names the attention used.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from megalodon.baseline import Llama
from megalodon.data.token_store import TokenStore
from megalodon.data.tokenizer import Tokenizer
from megalodon.inference.generate import evaluation_mode
from megalodon.inference.stream import RecencyWindow, check_truncate_chunks, default_block_tokens, stream_blocks
from megalodon.model import Megalodon
from megalodon.progress import progress_bar

DEFAULT_FIRST_EDGE = 1024
DEFAULT_MAX_CONTEXT = 8192
DEFAULT_BASELINE_BLOCK = 512
_PART_CHARS = 2_000_000  # of a long document, tokenized at a time


@dataclass
class EvalDocument:
    ids: Tensor  # 1-D int64, ending with end-of-sequence
    n_bytes: int  # UTF-8 bytes of the document's text
    name: str


def documents_from_texts(texts: Iterable[str], tokenizer: Tokenizer, names: Sequence[str] | None = None,
                         append_eos: bool = True) -> list[EvalDocument]:
    """Each text's ids, tokenized one text at a time and a long one in the parts its tokenizer can cut it into
    (Tokenizer.parts): what is held is the ids, never the tokenizer's work on a whole corpus, and `texts` may be a
    stream (UserDocuments)."""
    docs = []
    for i, text in enumerate(texts):
        ids = [np.asarray(tokenizer.encode(part), dtype=np.int64) for part in tokenizer.parts(text, _PART_CHARS)]
        ids += [np.asarray([tokenizer.eos_id], dtype=np.int64)] if append_eos else []
        docs.append(EvalDocument(torch.from_numpy(np.concatenate(ids)), len(text.encode("utf-8")),
                                 names[i] if names else f"doc{i}"))
    return docs


def documents_from_store(store: TokenStore, max_docs: int | None = None) -> list[EvalDocument]:
    count = store.n_docs if max_docs is None else min(max_docs, store.n_docs)
    return [EvalDocument(torch.from_numpy(store.document(i).astype(np.int64)), int(store.doc_bytes[i]),
                         f"{store.split}[{i}]") for i in range(count)]


def default_bucket_edges(longest: int, first: int = DEFAULT_FIRST_EDGE) -> list[int]:
    """0, first, 2 first, 4 first, ... until the last bucket holds position longest - 1."""
    edges = [0, first]
    while edges[-1] < longest:
        edges.append(edges[-1] * 2)
    return edges


def check_bucket_edges(edges: Sequence[int]) -> list[int]:
    edges = [int(e) for e in edges]
    if len(edges) < 2 or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bucket edges must start at 0 and increase strictly (at least two), got {edges}")
    return edges


@dataclass
class EvalResult:
    label: str
    settings: dict
    bucket_edges: list[int]  # the last bucket is [edges[-2], edges[-1]); positions beyond count in it too
    bucket_loss: list[float] = field(default_factory=list)  # summed nats per bucket
    bucket_tokens: list[int] = field(default_factory=list)
    documents: list[dict] = field(default_factory=list)
    nll: float = 0.0  # summed nats over all predicted tokens
    n_tokens: int = 0  # predicted tokens
    n_bytes: int = 0
    peak_state_bytes: int = 0  # the largest carried state (Megalodon) or KV cache (baseline) seen
    seconds: float = 0.0

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.n_tokens) if self.n_tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.n_bytes if self.n_bytes else float("nan")

    def buckets(self) -> list[dict]:
        out = []
        for i, (loss, count) in enumerate(zip(self.bucket_loss, self.bucket_tokens)):
            mean = loss / count if count else None
            out.append({"start": self.bucket_edges[i], "end": self.bucket_edges[i + 1], "tokens": count,
                        "mean_loss": mean, "perplexity": None if mean is None else math.exp(mean)})
        return out

    def to_dict(self) -> dict:
        return {"label": self.label, "settings": self.settings, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte, "nll_nats": self.nll, "tokens": self.n_tokens,
                "bytes": self.n_bytes, "peak_state_bytes": self.peak_state_bytes,
                "tokens_per_second": self.n_tokens / self.seconds if self.seconds else None,
                "loss_by_position": self.buckets(), "documents": self.documents}


def _megalodon_blocks(model: Megalodon, inputs: Tensor, block: int, truncate_chunks: int | None
                      ) -> Iterator[tuple[int, Tensor, int]]:
    window = None if truncate_chunks is None else RecencyWindow.empty(truncate_chunks, model.config.chunk_size, 0)
    for begin, logits, state in stream_blocks(model, inputs, None, block, window):
        yield begin, logits[0], state.nbytes


def _llama_blocks(model: Llama, inputs: Tensor, block: int, window: int | None) -> Iterator[tuple[int, Tensor, int]]:
    past = None
    for begin in range(0, inputs.numel(), block):
        logits, past = model(inputs[None, begin:begin + block], past=past, return_past=True, window=window)
        yield begin, logits[0], past.nbytes


def evaluate(
    model: Megalodon | Llama, documents: Sequence[EvalDocument], *, label: str | None = None,
    block_size: int | None = None, bucket_edges: Sequence[int] | None = None, truncate_chunks: int | None = None,
    window: int | None = None, max_context: int | None = DEFAULT_MAX_CONTEXT, progress: bool = False,
) -> EvalResult:
    """Stream every document through the model and measure its loss.

    block_size: tokens per call (Megalodon: a multiple of chunk_size, default about 4096; baseline: 512).
    truncate_chunks: Megalodon only (see stream.py). window / max_context: the baseline only (module docstring);
    max_context=None with no window means unbounded full attention.
    """
    settings, blocks = _scorer(model, block_size, truncate_chunks, window, max_context)
    documents = [d for d in documents if d.ids.numel() >= 2]
    if not documents:
        raise ValueError("no document has two tokens or more: there is nothing to predict")
    longest = max(d.ids.numel() for d in documents)
    edges = check_bucket_edges(bucket_edges) if bucket_edges is not None else default_bucket_edges(longest)
    result = EvalResult(label or settings["architecture"], settings, edges)
    device = next(model.parameters()).device
    # summed on the device, read once a document (doc_nll) and once at the end: no wait for a GPU a block
    loss_sums = torch.zeros(len(edges) - 1, dtype=torch.float64, device=device)
    token_counts = [0] * (len(edges) - 1)
    bar = progress_bar(total=sum(d.ids.numel() - 1 for d in documents), disable=not progress, unit="tok",
               desc=result.label, leave=False, mininterval=2.0)
    start_time = time.perf_counter()
    with evaluation_mode(model):
        for doc in documents:
            ids = doc.ids.to(device)
            doc_nll = torch.zeros((), dtype=torch.float64, device=device)
            for begin, logits, state_bytes in blocks(model, ids[:-1]):
                targets = ids[begin + 1:begin + 1 + logits.shape[0]]
                nll = F.cross_entropy(logits, targets, reduction="none").double()
                first, spans = position_buckets(edges, begin + 1, nll.numel())  # token i is at position begin + 1 + i
                loss_sums[first:first + len(spans)] += torch.stack([nll[a:b].sum() for a, b in spans])
                for k, (a, b) in enumerate(spans, first):
                    token_counts[k] += b - a
                doc_nll += nll.sum()
                result.peak_state_bytes = max(result.peak_state_bytes, state_bytes)
                bar.update(nll.numel())
            doc_nll = float(doc_nll)
            predicted = doc.ids.numel() - 1
            result.documents.append({"name": doc.name, "tokens": predicted, "bytes": doc.n_bytes,
                                     "perplexity": math.exp(doc_nll / predicted),
                                     "bits_per_byte": doc_nll / math.log(2) / doc.n_bytes if doc.n_bytes else None})
            result.nll += doc_nll
            result.n_tokens += predicted
            result.n_bytes += doc.n_bytes
    bar.close()
    result.seconds = time.perf_counter() - start_time
    result.bucket_loss, result.bucket_tokens = loss_sums.tolist(), token_counts
    return result


def position_buckets(edges: list[int], start: int, count: int) -> tuple[int, list[tuple[int, int]]]:
    """The buckets that positions start .. start + count - 1 fall in: the first one's index, and each one's
    (begin, end) offsets into those positions, in order. Bucket k holds edges[k] <= t < edges[k + 1]; positions
    beyond the last edge count in the last bucket."""
    inner = edges[1:-1]
    first = bisect.bisect_right(inner, start)
    cuts = inner[first:bisect.bisect_left(inner, start + count)]  # where a later bucket begins, inside the range
    bounds = [0, *(cut - start for cut in cuts), count]
    return first, list(zip(bounds[:-1], bounds[1:]))


def _scorer(model, block_size, truncate_chunks, window, max_context):
    """The settings to report and a function (model, inputs) -> iterator of (offset, logits, state bytes)."""
    check_truncate_chunks(truncate_chunks)
    for name, value in (("block_size", block_size), ("window", window), ("max_context", max_context)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
    if isinstance(model, Megalodon):
        if window is not None:
            raise ValueError("window applies to the baseline; Megalodon needs no window (its memory is constant)")
        chunk = model.config.chunk_size
        block = block_size or default_block_tokens(chunk, truncating=truncate_chunks is not None)
        if block % chunk:
            raise ValueError(f"block_size must be a multiple of chunk_size={chunk} for Megalodon, got {block}")
        settings = {"architecture": "megalodon", "block_size": block, "truncate_chunks": truncate_chunks,
                    "chunk_size": chunk}
        return settings, lambda m, inputs: _megalodon_blocks(m, inputs, block, truncate_chunks)
    if isinstance(model, Llama):
        if truncate_chunks is not None:
            raise ValueError("truncate_chunks applies to Megalodon only")
        attend = window if window is not None else max_context
        block = block_size or DEFAULT_BASELINE_BLOCK
        attention = "full (unbounded)" if attend is None else (
            f"sliding window of {attend}" if window is not None else
            f"full up to {attend} tokens, then a sliding window of {attend}")
        settings = {"architecture": "llama", "block_size": block, "window": attend, "attention": attention}
        return settings, lambda m, inputs: _llama_blocks(m, inputs, block, attend)
    raise ValueError(f"cannot evaluate a {type(model).__name__}: expected Megalodon or the Llama baseline")


def write_report(results: Sequence[EvalResult], out_dir: str | Path, info: dict | None = None,
                 ) -> tuple[Path, Path]:
    """eval.json (every result, plus `info` about the run; written whole or not at all) and
    loss_by_position.png in out_dir."""
    from megalodon.files import replace_file
    from megalodon.inference.plots import plot_loss_by_position

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = json.dumps({**(info or {}), "results": [r.to_dict() for r in results]}, indent=2) + "\n"
    json_path = replace_file(out_dir / "eval.json", lambda path: path.write_text(report))
    return json_path, plot_loss_by_position(results, out_dir / "loss_by_position.png")
