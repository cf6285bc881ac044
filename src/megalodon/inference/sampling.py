"""Choosing the next token: a validated sampling config and one pure, batched sampling function.

Every row draws from its own `torch.Generator` (one uniform number per sampled token, turned into a token by
inverse-CDF sampling), so a row's tokens depend only on its own seed and history, never on which other rows
share the batch, and a row's generator state is all a saved session needs to continue the same random stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens and when to stop.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: keep only the k most likely tokens (0 = no limit).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1 = no limit).
    repetition_penalty: > 1 discourages tokens generated earlier in this stream (the CTRL rule: positive logits
        are divided by it, negative ones multiplied); 1 disables it. The prompt is not penalized: over a
        book-length prompt almost every token would be.
    seed: row b of a batch samples with seed + b; None draws a seed (reported in the results).
    max_new_tokens: the most tokens to generate per prompt.
    stop_strings: generation stops once the text contains one of them; the returned text ends before it.
    stop_on_eos: stop after the tokenizer's end-of-sequence token.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128
    stop_strings: tuple[str, ...] = ()
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        # Accept any sequence of stop strings, store a tuple so the config stays hashable and immutable.
        if isinstance(self.stop_strings, str):
            raise ValueError(f"stop_strings must be a list of strings, got the string {self.stop_strings!r}")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = no limit), got {self.top_p!r}")
        if (not _is_number(self.repetition_penalty) or not math.isfinite(self.repetition_penalty)
                or self.repetition_penalty <= 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), "
                             f"got {self.repetition_penalty!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        for stop in self.stop_strings:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop_strings must hold non-empty strings, got {stop!r}")
        if not isinstance(self.stop_on_eos, bool):
            raise ValueError(f"stop_on_eos must be a bool, got {self.stop_on_eos!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def penalize_repetition(logits: Tensor, generated_ids: Tensor, penalty: float) -> Tensor:
    """Apply the repetition penalty to the tokens that appear in each row of generated_ids (-1 = no token)."""
    if penalty == 1.0 or generated_ids.numel() == 0:
        return logits
    valid = generated_ids >= 0
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen.scatter_(1, generated_ids.clamp(min=0), valid)  # B x V: True where the row generated the token
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set the logits outside the top-k / nucleus sets to -inf; the most likely token always stays."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: Tensor, generated_ids: Tensor | Sequence[Sequence[int]], cfg: SamplingConfig,
    generators: Sequence[torch.Generator] | None, uniforms: Tensor | None = None,
) -> Tensor:
    """The next token of every row: logits (B, V) -> ids (B,) int64.

    generated_ids: the tokens each row generated so far, as a (B, T) tensor padded with -1 or as lists
    (used by the repetition penalty only). generators: one per row (unused and may be None when greedy).
    uniforms: (B,) float64, the numbers the generators would draw, drawn beforehand (the decode loop draws them
    all at once, so that no copy to the GPU happens per token); generators are then not used.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (batch, vocab), got {tuple(logits.shape)}")
    batch = logits.shape[0]
    history = _as_padded_ids(generated_ids, batch, logits.device)
    logits = penalize_repetition(logits.double(), history, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(-1)
    if uniforms is None:
        if generators is None or len(generators) != batch:
            raise ValueError(f"sampling needs one torch.Generator per row ({batch}), "
                             f"got {None if generators is None else len(generators)}")
        uniforms = torch.stack([torch.rand((), generator=g, device=g.device, dtype=torch.float64).cpu()
                                for g in generators])
    elif uniforms.shape != (batch,):
        raise ValueError(f"uniforms must have shape ({batch},), got {tuple(uniforms.shape)}")
    logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    cdf = logits.softmax(-1).cumsum(-1)  # float64, so the tail of the CDF is not lost to rounding
    # The first token whose CDF exceeds u * total: tokens of probability 0 occupy an empty interval.
    targets = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def _as_padded_ids(generated_ids, batch: int, device) -> Tensor:
    if isinstance(generated_ids, Tensor):
        if generated_ids.dim() != 2 or generated_ids.shape[0] != batch:
            raise ValueError(f"generated_ids must have shape (batch={batch}, T), got {tuple(generated_ids.shape)}")
        return generated_ids.to(device=device, dtype=torch.int64)
    if len(generated_ids) != batch:
        raise ValueError(f"generated_ids holds {len(generated_ids)} rows, logits {batch}")
    longest = max((len(row) for row in generated_ids), default=0)
    padded = torch.full((batch, longest), -1, dtype=torch.int64)
    for b, row in enumerate(generated_ids):
        padded[b, :len(row)] = torch.as_tensor(list(row), dtype=torch.int64)
    return padded.to(device)


def make_generators(seed: int, batch: int) -> list[torch.Generator]:
    """Row b's generator, seeded with seed + b."""
    return [torch.Generator().manual_seed(seed + b) for b in range(batch)]
