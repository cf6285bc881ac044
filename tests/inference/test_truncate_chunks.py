"""truncate_chunks (spec section 13): off by default; replaces the norm statistics only; per row in batches."""

import torch

from megalodon.inference import SamplingConfig, generate
from megalodon.inference.stream import RecencyWindow, final_logits_and_state

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
