"""generate(): greedy, sampling, streaming, beam search and padded batches, checked against the core model."""

import contextlib

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import TextStreamer  # noqa: E402

from host_syncs import gpu_code_path, no_host_syncs  # noqa: E402
from megalodon.data import ByteTokenizer  # noqa: E402
from megalodon.hf import to_hf_tokenizer, wrap  # noqa: E402
from megalodon.hf.modeling import CACHE_ARG  # noqa: E402

PAD = 258


def _prompt(length, seed=0):
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def _manual_greedy(core, prompt, steps):
    """Prefill once, then one token at a time through the streaming state."""
    logits, state = core(prompt, return_state=True)
    tokens = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        logits, state = core(token, state=state, return_state=True)
    return torch.cat(tokens, dim=1)


def _left_padded(prompts):
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1]:] = p[0]
        mask[row, width - p.shape[1]:] = 1
    return ids, mask


def test_decode_steps_do_not_sync(hf_model, monkeypatch):
    """generate()'s one-token calls (a cache, the mask grown by a column) run the GPU's code without a host sync;
    the first step, which builds the static decoder, may read the state once."""
    gpu_code_path(monkeypatch)
    with torch.no_grad():  # as generate() runs
        cache = hf_model(_prompt(13), use_cache=True)[CACHE_ARG]
        ids = torch.tensor([[5]])
        for step in range(12):
            mask = torch.ones(1, 14 + step, dtype=torch.long)
            with no_host_syncs() if step else contextlib.nullcontext():
                logits = hf_model(ids, attention_mask=mask, use_cache=True, **{CACHE_ARG: cache}).logits
            ids = logits[:, -1].argmax(-1, keepdim=True)


def test_greedy_equals_a_manual_streaming_loop(core, hf_model):
    prompt = _prompt(13)
    out = hf_model.generate(prompt, max_new_tokens=20, do_sample=False)
    assert out.shape == (1, 33)  # max_new_tokens exactly: no eos configured
    assert torch.equal(out[:, :13], prompt)
    assert torch.equal(out[:, 13:], _manual_greedy(core, prompt, 20))


def test_generate_feeds_the_prompt_once_then_one_token_per_step(core, hf_model, monkeypatch):
    calls = []  # ("forward", tokens in, positions projected to logits) or ("static step", rows)

    def record(module, args, output):
        logits = output[0] if isinstance(output, tuple) else output
        calls.append(("forward", args[0].shape[1], logits.shape[1]))

    def static_step(input_ids, state, constants=None):
        calls.append(("static step", input_ids.shape[0]))
        return type(core).decode_step_(core, input_ids, state, constants)

    monkeypatch.setattr(core, "decode_step_", static_step)
    hook = core.register_forward_hook(record)
    try:
        hf_model.generate(_prompt(9), max_new_tokens=5, do_sample=False)
    finally:
        hook.remove()
    # The prefill projects only its last position; each new token then takes the static decode path.
    assert calls == [("forward", 9, 1)] + [("static step", 1)] * 4


def test_eos_stops_generation_within_max_new_tokens(core):
    prompt = _prompt(7)
    greedy = _manual_greedy(core, prompt, 6)
    stop_token = int(greedy[0, 2])  # make the third generated token the end of the document
    model = wrap(core, eos_token_id=stop_token, pad_token_id=PAD)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] <= 7 + 3 and int(out[0, -1]) == stop_token


def test_generation_continues_from_a_returned_cache(hf_model):
    prompt = _prompt(9).repeat(2, 1)
    whole = hf_model.generate(prompt, max_new_tokens=10, do_sample=False)
    first = hf_model.generate(prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    cache = first.get(CACHE_ARG)
    assert cache.get_seq_length() == 13  # the last generated token has not been fed yet
    second = hf_model.generate(first.sequences, max_new_tokens=5, do_sample=False, **{CACHE_ARG: cache})
    assert torch.equal(second, whole)


def test_a_cache_repeated_row_by_row_continues_like_repeated_prompts(hf_model):
    """What transformers asks of a cache besides steps: its rows repeated (each row's copies side by side), the
    copies then continuing as the repeated prompts would; and a crop, which a recurrent state cannot do, refused."""
    prompts = torch.cat([_prompt(9, seed=1), _prompt(9, seed=2)])
    cache = hf_model(prompts).get(CACHE_ARG)
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 4 and cache.get_seq_length() == 9 and "batch_size=4" in repr(cache)
    token = torch.tensor([[7], [7], [8], [8]])
    continued = hf_model(token, **{CACHE_ARG: cache}).logits
    repeated = hf_model(torch.cat([prompts.repeat_interleave(2, dim=0), token], dim=1)).logits[:, -1:]
    torch.testing.assert_close(continued, repeated, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(5)


def test_seeded_sampling_is_reproducible(hf_model):
    prompt = _prompt(5).repeat(2, 1)
    torch.manual_seed(123)
    first = hf_model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(123)
    second = hf_model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=0, temperature=1.0)
    assert torch.equal(first, second) and first.shape == (2, 17)
    assert not torch.equal(first[0], first[1])  # two rows, two different draws
    assert int(first.max()) < 259


def test_text_streamer_prints_the_generated_text(hf_model, capsys):
    tokenizer = to_hf_tokenizer(ByteTokenizer())
    prompt = torch.tensor([tokenizer.encode("Once upon a time")])
    out = hf_model.generate(prompt, max_new_tokens=10, do_sample=False,
                            streamer=TextStreamer(tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.rstrip("\n") == tokenizer.decode(out[0, prompt.shape[1]:])


def test_padded_batch_matches_each_prompt_alone(hf_model):
    # Lengths that leave the rows at different places in their chunks of 8, and 20 steps that cross chunks.
    prompts = [_prompt(n, seed=n) for n in (3, 9, 14, 9)]
    ids, mask = _left_padded(prompts)
    batch = hf_model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD)
    for row, prompt in enumerate(prompts):
        alone = hf_model.generate(prompt, max_new_tokens=20, do_sample=False)
        assert torch.equal(batch[row, ids.shape[1]:], alone[0, prompt.shape[1]:]), f"row {row}"


def test_beam_search_reorders_the_state(core, hf_model):
    # Without a cache generate recomputes every prefix, so it needs no reordering: the cached run must agree.
    prompts = [_prompt(n, seed=n) for n in (4, 11)]
    ids, mask = _left_padded(prompts)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, num_beams=3, do_sample=False, length_penalty=0.0,
                  pad_token_id=PAD, output_scores=True, return_dict_in_generate=True)
    cached = hf_model.generate(ids, use_cache=True, **kwargs)
    recomputed = hf_model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    # With length_penalty 0 a beam's score is the log-probability of its tokens: check it with the core.
    width = ids.shape[1]
    for row, prompt in enumerate(prompts):
        generated = cached.sequences[row:row + 1, width:]
        logits = core(torch.cat([prompt, generated], dim=1))[:, prompt.shape[1] - 1:-1]
        log_prob = logits.log_softmax(-1).gather(-1, generated[..., None]).sum()
        torch.testing.assert_close(cached.sequences_scores[row], log_prob, rtol=1e-4, atol=1e-4)
