"""generate(): exactness against a full forward, batching, stopping, streaming and input errors."""

import pytest
import torch

from megalodon.inference import SamplingConfig, generate

GREEDY = SamplingConfig(temperature=0, max_new_tokens=20, stop_on_eos=False)


def argmax_by_full_forward(model, prompt_ids: list[int], steps: int) -> list[int]:
    """Slow but obviously right: recompute the logits of the whole sequence for every new token."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_greedy_equals_argmax_over_full_forwards(model, tokenizer):
    prompt = "The quick brown fox jumps over the lazy dog, twice over."  # 56 tokens: 7 chunks
    result, = generate(model, tokenizer, [prompt], GREEDY)
    assert result.ids == argmax_by_full_forward(model, tokenizer.encode(prompt), 20)
    assert result.finish_reason == "length"
    assert int(result.state.position[0]) == len(tokenizer.encode(prompt)) + 20


def test_prompts_of_different_lengths_get_their_tokens_alone(model, tokenizer):
    prompts = ["a", "hello", "a somewhat longer prompt!", [7, 8, 9, 10, 11, 12, 13, 14]]
    batched = generate(model, tokenizer, prompts, GREEDY)
    for prompt, result in zip(prompts, batched):
        alone, = generate(model, tokenizer, [prompt], GREEDY)
        assert result.ids == alone.ids
        assert result.text == alone.text


def test_continuing_a_state_equals_the_whole_prompt(model, tokenizer):
    text = "a book of some length, read first; then a question?"
    prefix = tokenizer.encode(text[:30])
    _, state = model(torch.tensor([prefix]), return_state=True)
    continued, = generate(model, tokenizer, [text[30:]], GREEDY, state=state)
    whole, = generate(model, tokenizer, [text], GREEDY)
    assert continued.ids == whole.ids


def test_stop_strings_cut_the_text_and_streaming_matches(model, tokenizer):
    free, = generate(model, tokenizer, ["Once upon"], GREEDY)
    text = free.text
    # A random byte model writes mostly invalid UTF-8 (U+FFFD); take a clean pair of characters, else one.
    stop = next((text[k:k + 2] for k in range(1, len(text) - 2) if "\ufffd" not in text[k:k + 2]),
                next(c for c in text[1:] if c != "\ufffd"))
    streamed = []
    cfg = SamplingConfig(temperature=0, max_new_tokens=20, stop_on_eos=False, stop_strings=("never seen", stop))
    result, = generate(model, tokenizer, ["Once upon"], cfg, on_token=lambda row, tok, piece: streamed.append(piece))
    assert result.finish_reason == "stop_string"
    assert result.text == text[:text.find(stop)]
    assert "".join(streamed) == result.text
    assert result.ids == free.ids[:len(result.ids)]


def test_end_of_sequence_stops_a_row(model, tokenizer):
    free, = generate(model, tokenizer, ["xyz"], GREEDY)
    k = next(k for k in range(2, 20) if free.ids[k] not in free.ids[:k])
    tokenizer.eos_id = free.ids[k]  # pretend this generated token is end-of-sequence
    result, = generate(model, tokenizer, ["xyz"], SamplingConfig(temperature=0, max_new_tokens=20))
    assert result.finish_reason == "eos" and result.ids == free.ids[:k + 1]


def test_streaming_reports_every_token_of_every_row(model, tokenizer):
    seen = {0: [], 1: []}
    results = generate(model, tokenizer, ["ab", "cdefg"], SamplingConfig(temperature=0.8, seed=1, max_new_tokens=6),
                       on_token=lambda row, tok, piece: seen[row].append(tok))
    assert [seen[0], seen[1]] == [r.ids for r in results]


@pytest.mark.parametrize("prompts, message", [
    ([""], "prompt 0 is empty"),
    (["ok", []], "prompt 1 is empty"),
    ([[1, 2, 259]], "token id 259 is out of range"),
    ([[-1]], "token id -1 is out of range"),
    ([[1.5]], "must be integers"),
    ("a bare string", "list"),
    ([], "non-empty list"),
])
def test_bad_prompts_are_refused(model, tokenizer, prompts, message):
    with pytest.raises(ValueError, match=message):
        generate(model, tokenizer, prompts, GREEDY)


def test_bad_truncate_chunks_and_state_are_refused(model, tokenizer):
    with pytest.raises(ValueError, match="truncate_chunks"):
        generate(model, tokenizer, ["hi"], GREEDY, truncate_chunks=2)
    _, state = model(torch.tensor([[1, 2, 3]]), return_state=True)
    with pytest.raises(ValueError, match="1 rows but there are 2 prompts"):
        generate(model, tokenizer, ["a", "b"], GREEDY, state=state)


def sampled_one_token_at_a_time(model, prompt_ids: list[int], cfg: SamplingConfig, seed: int):
    """The plain loop: full forward per step through the MegalodonState, one generator draw per token."""
    from megalodon.inference import sample_next

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logits, state = model(torch.tensor([prompt_ids]), return_state=True)
        new: list[int] = []
        for _ in range(cfg.max_new_tokens):
            token = int(sample_next(logits[:, -1], [new], cfg, [generator])[0])
            new.append(token)
            logits, state = model(torch.tensor([[token]]), state=state, return_state=True)
    return new, generator.get_state()


@pytest.mark.parametrize("cfg", [
    SamplingConfig(temperature=0.9, top_k=20, seed=3, max_new_tokens=12, stop_on_eos=False),
    SamplingConfig(temperature=1.3, top_p=0.8, repetition_penalty=1.5, seed=4, max_new_tokens=12, stop_on_eos=False),
])
def test_sampling_on_the_static_decoder_equals_the_plain_loop(model, tokenizer, cfg):
    """Random numbers drawn up front and sampling on the device give each row the tokens, and leave its generator
    in the state, of the plain one-draw-per-token loop."""
    prompts = ["ab", "a longer prompt, across chunks"]
    results = generate(model, tokenizer, prompts, cfg)
    for b, (prompt, result) in enumerate(zip(prompts, results)):
        ids, rng_state = sampled_one_token_at_a_time(model, tokenizer.encode(prompt), cfg, cfg.seed + b)
        assert result.ids == ids
        assert torch.equal(result.session.rng_state, rng_state)


def test_rows_that_stop_early_get_their_tokens_state_and_logits_alone(model, tokenizer):
    """Rows stopping at different steps ride along, then the batch is compacted; each row's tokens, final state
    and next-token logits equal its own run's."""
    prompts = ["a", "bcd", "efghijklmnop", "qr"]
    free = generate(model, tokenizer, prompts, GREEDY)

    def stops(token: int) -> list[int]:  # how many tokens each row generates if `token` ends a sequence
        return [r.ids.index(token) + 1 if token in r.ids else len(r.ids) for r in free]

    # An end-of-sequence token that stops the rows at three or more different steps, so that the batch shrinks.
    tokenizer.eos_id = next(tok for r in free for tok in r.ids if len(set(stops(tok))) >= 3)
    cfg = SamplingConfig(temperature=0, max_new_tokens=20)
    batched = generate(model, tokenizer, prompts, cfg)
    assert [len(r.ids) for r in batched] == stops(tokenizer.eos_id)
    for prompt, result in zip(prompts, batched):
        alone, = generate(model, tokenizer, [prompt], cfg)
        assert result.ids == alone.ids and result.finish_reason == alone.finish_reason
        torch.testing.assert_close(result.session.next_logits, alone.session.next_logits, rtol=0, atol=1e-10)
        for name, tensor in alone.state.tensors().items():
            torch.testing.assert_close(result.state.tensors()[name], tensor, rtol=0, atol=1e-10)
