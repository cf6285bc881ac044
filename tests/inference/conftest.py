"""Tiny random models with a byte tokenizer, saved as model directories, for the inference tests."""

import pytest
import torch

from megalodon import Megalodon, MegalodonConfig
from megalodon.baseline import Llama, LlamaConfig
from megalodon.checkpoint import save_pretrained
from megalodon.data import ByteTokenizer

CHUNK = 8


def tiny_byte_config(**overrides) -> MegalodonConfig:
    values = dict(chunk_size=CHUNK, vocab_size=259, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=48,
                  norm_num_groups=4, cema_ndim=4)
    values.update(overrides)
    return MegalodonConfig.from_preset("tiny", **values)


def make_model(seed: int = 0, dtype=torch.float64, **overrides) -> Megalodon:
    torch.manual_seed(seed)
    model = Megalodon(tiny_byte_config(**overrides)).to(dtype).eval()
    with torch.no_grad():  # move the zero-initialized norm affines off zero so that they matter
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm.bias", "mega.gamma", "mega.beta")):
                param.normal_(0.0, 0.2)
    return model


@pytest.fixture(autouse=True)
def one_thread():
    """The test machines share two cores with other jobs; one thread is faster and steadier for tiny models.
    Also undo the CLI's flush-denormal setting, so that later tests see torch's defaults."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


@pytest.fixture
def model() -> Megalodon:
    return make_model()


@pytest.fixture
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def model_dir(tmp_path):
    directory = tmp_path / "megalodon"
    save_pretrained(make_model(dtype=torch.float32), directory)
    ByteTokenizer().save(directory)
    return directory


def make_llama(dtype=torch.float64) -> Llama:
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=259, num_layers=1, model_dim=32, num_heads=2, ffn_hidden_dim=64)
    return Llama(config).to(dtype).eval()


@pytest.fixture
def llama() -> Llama:
    return make_llama()


@pytest.fixture
def llama_dir(tmp_path):
    directory = tmp_path / "llama"
    save_pretrained(make_llama(torch.float32), directory)
    ByteTokenizer().save(directory)
    return directory


@pytest.fixture
def model_factory():
    """make_model(seed=..., dtype=..., **config overrides), for tests that need several models."""
    return make_model
