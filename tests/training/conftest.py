"""Fixtures of the trainer tests: a small corpus, and tiny run configurations as objects or files."""

import json

import pytest

from megalodon.training.config import TrainConfig
from training_helpers import run_values


@pytest.fixture
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    words = "the quick brown fox jumps over a lazy dog while seven bold wizards quietly hum".split()
    for i in range(6):
        text = "\n".join(" ".join(words[(i + j + k) % len(words)] for k in range(9)) for j in range(40))
        (root / f"doc{i}.txt").write_text(text)
    return root


@pytest.fixture
def make_config(corpus, tmp_path):
    return lambda **overrides: TrainConfig(**run_values(corpus, tmp_path, **overrides))


@pytest.fixture
def config_file(corpus, tmp_path):
    """Writes the tiny run's options (with overrides) to a JSON config file and returns its path."""
    def write(name="run.json", **overrides):
        path = tmp_path / name
        path.write_text(json.dumps(run_values(corpus, tmp_path, **overrides)))
        return path
    return write
