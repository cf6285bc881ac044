import pytest

from helpers import tiny_model


@pytest.fixture
def model():
    return tiny_model()
