"""write_slot_ / attend_slots (ops/static_kv.py) against attention over each row's valid slots alone, in float64."""

import math

import pytest
import torch

from megalodon.ops.static_kv import attend_slots, slot_step, write_slot_


@pytest.mark.parametrize("dv", [6, 5], ids=["sdpa", "materialized"])  # the Llama's dims, Megalodon's
def test_write_then_attend_equals_softmax_over_the_visible_slots(dv):
    gen = torch.Generator().manual_seed(0)
    batch, slots, heads, dk = 4, 9, 2, 6
    keys = torch.randn(batch, slots, heads, dk, dtype=torch.float64, generator=gen)  # stale entries everywhere
    values = torch.randn(batch, slots, heads, dv, dtype=torch.float64, generator=gen)
    q = torch.randn(batch, 1, heads, dk, dtype=torch.float64, generator=gen)
    k_new = torch.randn(batch, heads, dk, dtype=torch.float64, generator=gen)
    v_new = torch.randn(batch, heads, dv, dtype=torch.float64, generator=gen)
    last, first = torch.tensor([0, 3, 8, 5]), torch.tensor([0, 1, 8, 0])
    before = keys.clone()
    step = slot_step(last, slots, first)
    write_slot_(keys, step, k_new)
    write_slot_(values, step, v_new)
    out = attend_slots(q, keys, values, step)
    for b in range(batch):
        changed = (keys[b] != before[b]).any(-1).any(-1).nonzero().flatten().tolist()
        assert changed == [int(last[b])]  # only the row's own slot is written
        lo, hi = int(first[b]), int(last[b]) + 1
        scores = torch.einsum("hd,shd->hs", q[b, 0], keys[b, lo:hi]) / math.sqrt(dk)
        expected = torch.einsum("hs,shd->hd", scores.softmax(-1), values[b, lo:hi])
        torch.testing.assert_close(out[b, 0], expected, rtol=0, atol=1e-12)
    scaled = attend_slots(q, keys, values, slot_step(last, slots), scale=1.0)[1, 0]
    scores = torch.einsum("hd,shd->hs", q[1, 0], keys[1, :4])
    torch.testing.assert_close(scaled, torch.einsum("hs,shd->hd", scores.softmax(-1), values[1, :4]),
                               rtol=0, atol=1e-12)
