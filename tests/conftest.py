import pytest
import torch

from helpers import tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the suite runs one worker per core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    return tiny_model()
