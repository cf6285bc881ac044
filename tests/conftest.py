import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. The interpreter is chosen when a
# kernel is decorated, so this must happen before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
