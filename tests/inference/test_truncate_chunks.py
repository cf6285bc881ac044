"""truncate_chunks (spec section 13): off by default; replaces the norm statistics only; per row in batches."""

import math

import pytest
import torch
import torch.nn.functional as F

from megalodon import MegalodonState
from megalodon.inference import EvalDocument, SamplingConfig, evaluate, generate
from megalodon.inference.stream import RecencyWindow, final_logits_and_state, stream_blocks
from megalodon.state import LayerState

C = 8


def test_it_replaces_only_the_norm_statistics(model):
    ids = torch.randint(0, 259, (8 * C,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, plain = final_logits_and_state(model, ids)
        _, truncated = final_logits_and_state(model, ids, window=RecencyWindow.empty(8, C, 0))
        _, recent = model(ids[None, 2 * C:], return_state=True)  # the last 6 chunks, from an empty state
    for layer_plain, layer_trunc, layer_recent in zip(plain.layers, truncated.layers, recent.layers):
        # Equal up to rounding: the window feeds 2-chunk blocks, the plain stream one block.
        torch.testing.assert_close(layer_plain.cema_h, layer_trunc.cema_h, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer_plain.k_cache, layer_trunc.k_cache, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer_plain.v_cache, layer_trunc.v_cache, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(layer_plain.norm.mean, layer_trunc.norm.mean)
        assert int(layer_trunc.norm.count) == 6 * C
        for got, want in zip(layer_trunc.norm, layer_recent.norm):
            torch.testing.assert_close(got, want)
    for got, want in zip(truncated.final_norm, recent.final_norm):
        torch.testing.assert_close(got, want)
    assert torch.equal(truncated.position, plain.position)


def test_the_window_fires_every_two_chunks_past_the_threshold():
    window = RecencyWindow.empty(8, C, 0)
    fired = []
    for block in range(14):
        window.extend(torch.zeros(C, dtype=torch.int64))
        if window.due():
            window.rerun_span()
            fired.append((block + 1, window.start))
    assert fired == [(8, 2 * C), (10, 4 * C), (12, 6 * C), (14, 8 * C)]


def test_generation_leaves_it_off_by_default(model, tokenizer):
    prompt = [int(t) for t in torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(1))]
    greedy = SamplingConfig(temperature=0, max_new_tokens=4, stop_on_eos=False)
    default, = generate(model, tokenizer, [prompt], greedy)
    on, = generate(model, tokenizer, [prompt], greedy, truncate_chunks=8)
    with torch.no_grad():
        _, full = model(torch.tensor([prompt + default.ids]), return_state=True)
    assert default.session.truncate_chunks is None and on.session.truncate_chunks == 8
    torch.testing.assert_close(default.state.layers[0].norm.mean, full.layers[0].norm.mean)
    assert int(on.state.layers[0].norm.count) < int(default.state.layers[0].norm.count)


def test_rows_truncate_on_their_own_schedule_in_a_batch(model, tokenizer):
    prompts = ["x" * 20, "a longer prompt, this one"]  # they reach 3 chunks at different decode steps
    sampling = SamplingConfig(temperature=0, max_new_tokens=12, stop_on_eos=False)
    batched = generate(model, tokenizer, prompts, sampling, truncate_chunks=3)
    for prompt, result in zip(prompts, batched):
        alone, = generate(model, tokenizer, [prompt], sampling, truncate_chunks=3)
        assert result.ids == alone.ids
        torch.testing.assert_close(result.state.final_norm.mean, alone.state.final_norm.mean)


def reference_evaluation_logits(model, tokens, truncate_chunks=8, chunks_per_call=2):
    """A literal port of the reference's evaluation loop (megalodon/inference.py, `inference`): whole chunks in
    calls of 2 chunks (the last may be 1), a rerun on the last truncate_chunks - 2 chunks after every call that
    ends at or past truncate_chunks chunks, except after the last call when no partial tail follows; then the
    tail in one call."""
    length = tokens.shape[1]
    n_chunks = length // C
    prev_pos = n_chunks * C
    state, logits = None, []
    for c in range(0, n_chunks, chunks_per_call):
        s, e = c * C, min(c + chunks_per_call, n_chunks) * C
        pred, state = model(tokens[:, s:e], state=state, return_state=True)
        logits.append(pred)
        if truncate_chunks * C <= e and (e < n_chunks * C or prev_pos < length):
            ss = e - (truncate_chunks - chunks_per_call) * C
            _, fresh = model(tokens[:, ss:e], return_state=True)
            layers = [LayerState(ours.cema_h, theirs.norm, ours.k_cache, ours.v_cache)
                      for ours, theirs in zip(state.layers, fresh.layers)]
            state = MegalodonState(layers, fresh.final_norm, state.position)
    if prev_pos < length:
        logits.append(model(tokens[:, prev_pos:], state=state))
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("length", [9 * C + 5, 11 * C + 3, 13 * C + 1, 8 * C, 9 * C, 10 * C + 5, 16 * C])
def test_evaluation_equals_the_reference_loop(model, length):
    ids = torch.randint(0, 259, (length,), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        want = reference_evaluation_logits(model, ids[None])
        window = RecencyWindow.empty(8, C, 0)
        got = torch.cat([logits for _, logits, _ in stream_blocks(model, ids, window=window)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_evaluate_uses_the_reference_schedule(model):
    doc = EvalDocument(torch.randint(0, 259, (11 * C + 4,), generator=torch.Generator().manual_seed(3)), 1, "d")
    with torch.no_grad():
        logits = reference_evaluation_logits(model, doc.ids[None, :-1])[0]
    nll = F.cross_entropy(logits, doc.ids[1:], reduction="sum")
    assert math.isclose(evaluate(model, [doc], truncate_chunks=8).nll, float(nll), rel_tol=1e-11)
