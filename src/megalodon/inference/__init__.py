"""Inference: generation with sessions, and long-document evaluation against the baseline.

sampling.py     SamplingConfig and the pure, batched next-token sampler
stream.py       chunk-aligned block feeding; the optional truncate_chunks trick (spec section 13)
text_stream.py  ids -> printable text, incrementally, with stop strings
generate.py     generate(): per-prompt prefill, stacked states, batched decode (spec section 16)
session.py      Session, save_session / load_session: continue a conversation without re-reading it
evaluate.py     evaluate(): perplexity, bits/byte and loss by position at constant memory; the JSON report
plots.py        the loss-by-position figure
commands.py     `megalodon generate` and `megalodon eval`
"""

from megalodon.inference.evaluate import (
    EvalDocument, EvalResult, documents_from_store, documents_from_texts, evaluate, write_report,
)
from megalodon.inference.generate import GenerationResult, generate, prefill_session
from megalodon.inference.sampling import SamplingConfig, sample_next
from megalodon.inference.session import Session, load_session, save_session

__all__ = [
    "EvalDocument", "EvalResult", "GenerationResult", "SamplingConfig", "Session",
    "documents_from_store", "documents_from_texts", "evaluate", "generate", "load_session", "prefill_session",
    "sample_next", "save_session", "write_report",
]
