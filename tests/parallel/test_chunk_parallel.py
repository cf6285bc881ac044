"""Chunk parallelism across spawned gloo ranks equals one process on the full sequence (spec section 14)."""

import pytest

import dist_tasks
from helpers import tiny_model
from megalodon.parallel import apply_chunk_parallel

TOL = 1e-5


@pytest.mark.parametrize("chunk_parallel", [2, 4])
def test_chunk_parallel_equals_one_process(ranks, chunk_parallel):
    """Documents cross rank boundaries and start exactly on them; fresh and with an incoming state."""
    for rank, errors in enumerate(ranks().run(dist_tasks.chunk_parallel_matches_one_process, chunk_parallel)):
        for case, err in errors.items():
            assert max(err.values()) < TOL, (rank, case, err)


def test_bad_inputs_fail_on_every_rank_with_clear_errors(ranks):
    for messages in ranks().run(dist_tasks.bad_inputs_raise):
        assert "hold [12, 20] tokens" in messages["segments"] and "chunk_size=8" in messages["segments"], messages
        assert "multiple of 2 x chunk_size = 16, got 24" in messages["local_segment"], messages
        assert "use apply_fsdp" in messages["ddp"], messages


def test_apply_chunk_parallel_twice_is_refused():
    model = apply_chunk_parallel(tiny_model(), group=None)
    with pytest.raises(TypeError, match="apply it once"):
        apply_chunk_parallel(model, group=None)
