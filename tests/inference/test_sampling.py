"""SamplingConfig validation and the pure sampler."""

import pytest
import torch

from megalodon.inference.sampling import SamplingConfig, make_generators, sample_next


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_k", -1), ("top_k", 2.5), ("top_p", 0.0), ("top_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("seed", -3), ("seed", 1.5),
    ("max_new_tokens", 0), ("max_new_tokens", True), ("stop_strings", [""]), ("stop_strings", "stop"),
    ("stop_on_eos", "yes"),
])
def test_invalid_values_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


def test_greedy_is_argmax_and_needs_no_generator():
    logits = torch.randn(3, 50)
    assert torch.equal(sample_next(logits, [[], [], []], SamplingConfig(temperature=0), None), logits.argmax(-1))


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50)
    for cfg in (SamplingConfig(top_k=1, seed=0), SamplingConfig(top_p=1e-6, seed=0)):
        tokens = sample_next(logits, torch.zeros(4, 0, dtype=torch.int64), cfg, make_generators(0, 4))
        assert torch.equal(tokens, logits.argmax(-1))


def test_top_k_never_samples_outside_the_k_best():
    logits = torch.randn(1, 30)
    allowed = set(logits[0].topk(3).indices.tolist())
    generators = make_generators(5, 1)
    drawn = {int(sample_next(logits, [[]], SamplingConfig(top_k=3), generators)) for _ in range(200)}
    assert drawn <= allowed and len(drawn) > 1


def test_repetition_penalty_moves_away_from_generated_tokens():
    logits = torch.tensor([[3.0, 2.9, -1.0]])
    cfg = SamplingConfig(temperature=0, repetition_penalty=2.0)
    assert int(sample_next(logits, [[0]], cfg, None)) == 1
    assert int(sample_next(logits, [[2]], cfg, None)) == 0
    assert int(sample_next(logits, torch.tensor([[-1, 0]]), cfg, None)) == 1  # -1 marks an empty slot


def test_rows_sample_independently_of_their_batch():
    logits = torch.randn(3, 40)
    cfg = SamplingConfig(temperature=0.9, top_p=0.95)
    together = sample_next(logits, [[], [], []], cfg, make_generators(11, 3))
    alone = [int(sample_next(logits[b:b + 1], [[]], cfg, [make_generators(11, 3)[b]])) for b in range(3)]
    assert together.tolist() == alone


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1, 0.0])
    logits = probs.log().expand(4000, -1)
    tokens = sample_next(logits, torch.zeros(4000, 0, dtype=torch.int64), SamplingConfig(), make_generators(3, 4000))
    freq = torch.bincount(tokens, minlength=4).double() / 4000
    assert freq[3] == 0 and torch.allclose(freq, probs.double(), atol=0.03)


def test_sampling_needs_one_generator_per_row():
    with pytest.raises(ValueError, match="one torch.Generator per row"):
        sample_next(torch.randn(2, 5), [[], []], SamplingConfig(), make_generators(0, 1))
