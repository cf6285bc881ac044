"""Fixtures for the transformers integration: tiny seeded models, wrapped and unwrapped.

Nothing here may reach the Hub: the offline switches are set before transformers or datasets is imported.
"""

from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# datasets (under lm-eval) and transformers' remote-code loader write caches under HF_HOME: keep them out of ~.
os.environ.setdefault("HF_HOME", os.path.join(tempfile.gettempdir(), "megalodon-hf-tests"))

import pytest  # noqa: E402
import torch  # noqa: E402

from megalodon import Megalodon, MegalodonConfig  # noqa: E402

BYTE_SPECIAL_IDS = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}  # ByteTokenizer's


def build_core(seed: int = 0, **overrides) -> Megalodon:
    """A 133k-parameter fp32 model over the byte vocabulary, with chunk 8 so that short prompts cross chunks."""
    values = dict(vocab_size=259, chunk_size=8)
    values.update(overrides)
    torch.manual_seed(seed)
    model = Megalodon(MegalodonConfig.from_preset("tiny", **values)).eval()
    with torch.no_grad():  # move the zero-initialized affines off zero so that they are exercised
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm.bias", "mega.gamma", "mega.beta", "rmsnorm.weight")):
                param.normal_(0.0, 0.1)
    return model


@pytest.fixture
def make_core():
    """make_core(seed=0, **config_overrides) -> a tiny seeded core Megalodon in eval mode."""
    return build_core


@pytest.fixture
def core():
    return build_core()


@pytest.fixture
def hf_model(core):
    """MegalodonForCausalLM sharing `core`'s parameters, without special ids (generation never stops early)."""
    from megalodon.hf import wrap

    return wrap(core)
