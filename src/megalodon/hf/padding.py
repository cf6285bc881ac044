"""Padded batches: run each row on its real tokens only, so that every stream starts at its first real token.

Megalodon has no attention mask to hide padding behind: the EMA, the timestep norm and the chunk grid all
start at the first token of a stream. A padded row is therefore exact only if it is run without its pads.
Rows of equal real length run together in one call; their states are then stacked back into batch order
(rows may end at different positions inside their chunks, which single-token decoding accepts).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megalodon.model import Megalodon
from megalodon.state import MegalodonState


def real_token_spans(attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(start, length) of each row's real tokens; refuses masks whose ones are not one contiguous run."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must have shape (batch, length), got {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        row = int((lengths == 0).nonzero()[0])
        raise ValueError(f"attention_mask row {row} has no real token: every row needs at least one")
    starts = mask.to(torch.int64).argmax(dim=1)
    columns = torch.arange(mask.shape[1], device=mask.device)
    spans = (columns >= starts[:, None]) & (columns < (starts + lengths)[:, None])
    if not torch.equal(spans, mask):
        row = int((spans != mask).any(dim=1).nonzero()[0])
        raise ValueError(f"attention_mask row {row} has padding between real tokens; only left padding "
                         "(or right padding) is supported")
    return starts, lengths


def forward_rows(model: Megalodon, input_ids: Tensor, starts: Tensor, lengths: Tensor, logits_to_keep: int = 0
                 ) -> tuple[Tensor, MegalodonState]:
    """Logits in the padded layout (zeros at pads) and the state of each row after its last real token.

    logits_to_keep > 0: only the last logits_to_keep columns of the padded layout (B, logits_to_keep, V).
    """
    batch, width = input_ids.shape
    kept_width = min(logits_to_keep, width) if logits_to_keep else width
    first_kept = width - kept_width  # padded column of output column 0
    logits = None
    group_rows, group_states = [], []
    for length in lengths.unique().tolist():
        rows = (lengths == length).nonzero().squeeze(1)  # R
        columns = starts[rows, None] + torch.arange(length, device=input_ids.device)  # R x length
        kept = min(kept_width, length)
        out, state = model(input_ids[rows[:, None], columns], return_state=True, logits_to_keep=kept)  # R x kept x V
        if logits is None:
            logits = out.new_zeros(batch, kept_width, out.shape[-1])
        out_columns = columns[:, length - kept:] - first_kept
        inside = out_columns >= 0  # right-padded rows may end before the kept columns
        logits[rows[:, None].expand_as(out_columns)[inside], out_columns[inside]] = out[inside]
        group_rows.append(rows)
        group_states.append(state)
    state = MegalodonState.stack(group_states)
    batch_order = torch.argsort(torch.cat(group_rows))  # batch row b -> its row in the stacked state
    return logits, state.map(lambda t: t.index_select(0, batch_order.to(t.device)))
