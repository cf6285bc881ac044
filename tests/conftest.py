import os
import signal

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. The interpreter is chosen when a
# kernel is decorated, so this must happen before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    from triton_interpreter import patch_language_once_per_launch

    patch_language_once_per_launch()

from helpers import tiny_model


def pytest_collection_modifyitems(items):
    """The slow tests first (stable otherwise): with one worker per core, a long test started last would keep one
    core busy for minutes after the other had run out of work."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the suite runs one worker per core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def ctrl_c_interrupts():
    """Ctrl-C raises KeyboardInterrupt, as in a user's terminal, even where the suite runs as a background job,
    which inherits SIGINT ignored (the CLI then leaves it ignored, and the Ctrl-C tests would see no signal)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def model():
    return tiny_model()
