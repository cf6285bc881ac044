"""measure_decode runs both models' fast decode end to end (no timing is checked: tests never time anything)."""

import math

import pytest
from megalodon.inference.benchmark import measure_decode, measure_decode_variants


@pytest.mark.parametrize("arch", ["model", "llama"])
def test_measure_decode_reports_both_models(request, arch):
    model = request.getfixturevalue(arch)  # the tiny Megalodon or Llama of conftest.py
    real = measure_decode(model, position=11, steps=3, batch_size=2, warmup=1)
    assert real["decode_tokens_per_s"] > 0 and real["prefill_tokens_per_s"] > 0 and real["state_bytes"] > 0
    if arch == "llama":  # beyond the prefill limit the cache is filled synthetically
        synthetic = measure_decode(model, position=40, steps=2, warmup=0, llama_prefill_limit=16)
        assert math.isnan(synthetic["prefill_tokens_per_s"]) and synthetic["position"] == 40
    with pytest.raises(ValueError, match="position"):
        measure_decode(model, position=0, steps=3)


@pytest.mark.parametrize("arch", ["model", "llama"])
def test_variants_share_one_prefill_and_decode_the_same_stream(request, arch):
    """Each variant starts from the prefilled state: the state is restored after every variant, so identical
    variants decode identical greedy streams."""
    model = request.getfixturevalue(arch)
    first, second = measure_decode_variants(model, position=13, steps=4, compile_variants=[False, False], warmup=1)
    assert first["tokens"] == second["tokens"] and len(first["tokens"][0]) == 4
    assert first["prefill_tokens_per_s"] == second["prefill_tokens_per_s"]
    with pytest.raises(ValueError, match="compile_variants"):
        measure_decode_variants(model, position=13, steps=4, compile_variants=[])
