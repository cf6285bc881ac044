"""Bad input gets a clear ValueError/TypeError at the boundary, never an index error from deep inside."""

import pytest
import torch

from helpers import tiny_model


def test_token_ids_out_of_range(model):
    with pytest.raises(ValueError, match="token id 64 is out of range"):
        model(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))


def test_non_integer_ids(model):
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[1, 2]])


def test_empty_and_wrong_shape(model):
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="unsqueeze"):
        model(torch.zeros(5, dtype=torch.long))


def test_state_from_other_batch_or_config(model):
    _, state = model(torch.zeros(2, 5, dtype=torch.long), return_state=True)
    with pytest.raises(ValueError, match="holds 2 rows"):
        model(torch.zeros(3, 1, dtype=torch.long), state=state)
    other = tiny_model(model_dim=48)
    with pytest.raises(ValueError, match="different config"):
        other(torch.zeros(2, 1, dtype=torch.long), state=state)


def test_doc_start_off_the_chunk_grid(model):
    ids = torch.zeros(1, 20, dtype=torch.long)
    doc_start = torch.zeros(1, 20, dtype=torch.bool)
    doc_start[0, 5] = True
    with pytest.raises(ValueError, match="chunk grid"):
        model(ids, doc_start=doc_start)


def test_logits_to_keep_must_be_a_non_negative_int(model):
    ids = torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="logits_to_keep must be >= 0"):
        model(ids, logits_to_keep=-1)
    for bad in (1.5, True, "2"):
        with pytest.raises(TypeError, match="logits_to_keep must be an int"):
            model(ids, logits_to_keep=bad)
    assert model(ids, logits_to_keep=9).shape[1] == 6  # more than there are: all of them


def test_ids_must_be_int64_or_int32(model):
    for dtype in (torch.uint8, torch.int16):
        with pytest.raises(TypeError, match=r"int64.*input_ids.long\(\)"):
            model(torch.zeros(1, 4, dtype=dtype))
    assert model(torch.zeros(1, 4, dtype=torch.int32)).shape == (1, 4, 64)


def test_doc_start_as_a_list(model):
    with pytest.raises(TypeError, match="doc_start must be a torch.Tensor"):
        model(torch.zeros(1, 4, dtype=torch.long), doc_start=[[True, False, False, False]])


def test_multi_token_call_on_rows_at_different_fills(model):
    from megalodon import MegalodonState

    states = [model(torch.zeros(1, n, dtype=torch.long), return_state=True)[1] for n in (3, 5)]
    with pytest.raises(ValueError, match="different positions inside their chunks"):
        model(torch.zeros(2, 2, dtype=torch.long), state=MegalodonState.stack(states))


def test_static_decoding_is_refused_what_it_cannot_hold(model):
    """The static decode path's boundary: what turns a MegalodonState into buffers, and the in-place step."""
    from megalodon import MegalodonState
    from megalodon.decode_state import DecodeState

    _, state = model(torch.zeros(2, 5, dtype=torch.long), return_state=True)
    with pytest.raises(TypeError, match="needs a MegalodonState, got dict"):
        DecodeState.from_state({}, model.config)
    with pytest.raises(ValueError, match="no layers"):
        DecodeState.from_state(MegalodonState([], state.final_norm, state.position), model.config)
    negative = MegalodonState(state.layers, state.final_norm, torch.tensor([5, -1]))
    with pytest.raises(ValueError, match=r"count tokens seen \(>= 0\), got \[5, -1\]"):
        DecodeState.from_state(negative, model.config)
    buffers = DecodeState.from_state(state, model.config)
    for rows in ([], [[0, 1]]):
        with pytest.raises(ValueError, match="non-empty 1-D list of rows"):
            buffers.select(rows)
    with pytest.raises(ValueError, match=r"one token id per row, shape \(2,\), got \(2, 1\)"):
        model.decode_step_(torch.zeros(2, 1, dtype=torch.long), buffers)
    with pytest.raises(TypeError, match="state must be a MegalodonState, got DecodeState"):
        model(torch.zeros(2, 1, dtype=torch.long), state=buffers)
    with pytest.raises(ValueError, match=r"doc_start must be a bool tensor of shape \(1, 4\)"):
        model(torch.zeros(1, 4, dtype=torch.long), doc_start=torch.zeros(1, 4, dtype=torch.long))
