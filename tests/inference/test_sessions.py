"""Sessions: resume exactly, continue a conversation without re-reading it, refuse other models' files."""

import pytest

from megalodon import MegalodonState
from megalodon.checkpoint import save_pretrained
from megalodon.inference import SamplingConfig, generate, load_session, prefill_session, save_session

SAMPLED = dict(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.3, seed=7, stop_on_eos=False)


@pytest.mark.parametrize("truncate_chunks", [None, 3])
def test_resumed_output_equals_uninterrupted_output(model, tokenizer, tmp_path, truncate_chunks):
    prompt = "It was a dark and stormy night"  # 30 tokens; with truncation the window fires while decoding
    whole, = generate(model, tokenizer, [prompt], SamplingConfig(max_new_tokens=16, **SAMPLED),
                      truncate_chunks=truncate_chunks)
    first, = generate(model, tokenizer, [prompt], SamplingConfig(max_new_tokens=6, **SAMPLED),
                      truncate_chunks=truncate_chunks)
    save_session(tmp_path / "s.safetensors", first.session, model, tokenizer)
    session = load_session(tmp_path / "s.safetensors", model, tokenizer)
    assert session.truncate_chunks == truncate_chunks
    rest, = generate(model, tokenizer, [""], SamplingConfig(max_new_tokens=10, **SAMPLED), sessions=[session])
    assert first.ids + rest.ids == whole.ids
    assert rest.session.generated_ids == whole.ids


def test_a_session_answers_without_rereading(model, tokenizer, tmp_path):
    book, question = "Call me Ishmael. Some years ago, never mind how long.", " Who? "
    greedy = SamplingConfig(temperature=0, max_new_tokens=8, stop_on_eos=False)
    save_session(tmp_path / "book", prefill_session(model, tokenizer, book), model, tokenizer)
    answer, = generate(model, tokenizer, [question], greedy, sessions=[load_session(tmp_path / "book", model,
                                                                                     tokenizer)])
    reread, = generate(model, tokenizer, [book + question], greedy)
    assert answer.ids == reread.ids


def test_state_size_does_not_grow_with_position(model, tokenizer):
    greedy = SamplingConfig(temperature=0, max_new_tokens=1, stop_on_eos=False)
    near, far = (generate(model, tokenizer, [[65] * n], greedy, prefill_chunks=128)[0].state for n in (100, 5004))
    assert int(near.position[0]) % 8 == int(far.position[0]) % 8 and int(far.position[0]) == 5005
    assert near.nbytes == far.nbytes


def test_sessions_from_another_model_are_refused(model, tokenizer, tmp_path, model_factory):
    result, = generate(model, tokenizer, ["hi"], SamplingConfig(temperature=0, max_new_tokens=2))
    path = tmp_path / "s.safetensors"
    save_session(path, result.session, model, tokenizer)
    with pytest.raises(ValueError, match="different model"):
        load_session(path, model_factory(seed=5), tokenizer)
    with pytest.raises(ValueError, match="different config"):
        load_session(path, model_factory(model_dim=64, norm_num_groups=8), tokenizer)
    result.state.save(tmp_path / "bare.safetensors", model.config)
    with pytest.raises(ValueError, match="not a session"):
        load_session(tmp_path / "bare.safetensors", model, tokenizer)


def test_a_batch_state_is_not_a_session(model, tokenizer, tmp_path):
    results = generate(model, tokenizer, ["a", "b"], SamplingConfig(temperature=0, max_new_tokens=1))
    session = results[0].session
    session.state = MegalodonState.stack([results[0].state, results[1].state])
    with pytest.raises(ValueError, match="one conversation"):
        save_session(tmp_path / "x", session, model, tokenizer)


def test_a_saved_and_reloaded_model_reads_its_sessions(model_dir, tokenizer, tmp_path):
    from megalodon.checkpoint import load_pretrained

    model = load_pretrained(model_dir)
    result, = generate(model, tokenizer, ["hi"], SamplingConfig(temperature=0, max_new_tokens=2))
    save_session(tmp_path / "s", result.session, model, tokenizer)
    save_pretrained(model, tmp_path / "copy")
    assert load_session(tmp_path / "s", load_pretrained(tmp_path / "copy"), tokenizer).position == 4
