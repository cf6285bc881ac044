"""MegalodonState's Python API refuses what it cannot do (issue 12, "Python API"): each case passed silently
before."""

import itertools

import pytest
import torch

from helpers import requires_cuda, tiny_model
from megalodon import MegalodonState


@pytest.fixture
def state():
    model = tiny_model(torch.float32)
    return model(torch.randint(0, 64, (2, 11)), return_state=True)[1]


@pytest.mark.parametrize("index", [5, -3, 2, slice(2, 5), [0, 2], torch.tensor([1, 2]), []])
def test_rows_outside_the_batch_are_refused(state, index):
    with pytest.raises(ValueError, match="rows|row"):
        state[index]


@pytest.mark.parametrize("index", [1.0, True, torch.tensor([0.0]), torch.zeros(1, 1, dtype=torch.int64), "0"])
def test_row_indices_of_the_wrong_type_are_refused(state, index):
    with pytest.raises(TypeError):
        state[index]


def test_valid_selections(state):
    assert state[-1].position.tolist() == [11]
    assert state[[1, 0]].batch_size == 2 and state[torch.tensor([True, False])].batch_size == 1
    rows = list(itertools.islice(state, 3))  # iteration stops at the end of the batch (it never did)
    assert len(rows) == len(state) == 2 and all(row.batch_size == 1 for row in rows)
    torch.testing.assert_close(state[1].layers[0].cema_h, state.layers[0].cema_h[1:])


def test_a_negative_position_is_refused():
    model = tiny_model(torch.float32)
    _, state = model(torch.randint(0, 64, (2, 5)), return_state=True)
    state.position = torch.tensor([5, -1])
    with pytest.raises(ValueError, match="position"):
        model(torch.randint(0, 64, (2, 1)), state=state)
    state.position = torch.tensor([5.0, 5.0])
    with pytest.raises(ValueError, match="int64"):
        model(torch.randint(0, 64, (2, 1)), state=state)


def test_a_negative_position_in_a_file_is_refused(tmp_path, state):
    state.position = torch.tensor([3, -2])
    state.save(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="position"):
        MegalodonState.load(tmp_path / "s.safetensors")


def test_stacking_states_of_different_models_is_refused(state):
    three_layers = tiny_model(torch.float32, num_layers=3)(torch.randint(0, 64, (1, 4)), return_state=True)[1]
    with pytest.raises(ValueError, match="layers"):
        MegalodonState.stack([state, three_layers])
    wider = tiny_model(torch.float32, model_dim=48)(torch.randint(0, 64, (1, 4)), return_state=True)[1]
    with pytest.raises(ValueError, match="cema_h"):
        MegalodonState.stack([state, wider])
    with pytest.raises(TypeError, match="MegalodonState"):
        MegalodonState.stack([state, "state"])
    assert MegalodonState.stack([state, state[0]]).batch_size == 3


def test_to_takes_a_device_and_refuses_a_dtype(state):
    with pytest.raises(TypeError, match="dtype|device"):
        state.to(torch.float16)
    with pytest.raises(TypeError, match="dtype|device"):
        state.to("cpu", dtype=torch.float64)
    with pytest.raises(TypeError, match="device"):
        state.to(3.5)
    moved = state.to(torch.device("cpu"))
    assert moved.layers[0].cema_h.dtype == torch.complex64 and moved.device.type == "cpu"


@requires_cuda
def test_to_keeps_a_cuda_state_on_its_device(state):
    on_gpu = state.to("cuda")
    assert on_gpu.device.type == "cuda"
    with pytest.raises(TypeError):
        on_gpu.to(torch.float32)
