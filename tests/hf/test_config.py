"""MegalodonHFConfig mirrors MegalodonConfig field for field, and the Auto classes resolve it."""

import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from megalodon import MegalodonConfig  # noqa: E402
from megalodon.hf import MegalodonForCausalLM, MegalodonHFConfig  # noqa: E402


def test_core_fields_round_trip_through_the_hf_config(tmp_path):
    core = MegalodonConfig.from_preset("small", vocab_size=300, rope_base=5e5, dropout=0.1)
    config = MegalodonHFConfig.from_core(core, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    assert config.to_core() == core
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is MegalodonHFConfig
    assert loaded.to_core() == core
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 1, 2)
    assert loaded.tie_word_embeddings is True  # the small preset shares the embedding
    assert MegalodonHFConfig.from_dict(config.to_dict()).to_core() == core


def test_every_core_field_keeps_its_name():
    config = MegalodonHFConfig.from_core(MegalodonConfig.from_preset("tiny"))
    exported = config.to_dict()
    for name, value in MegalodonConfig.from_preset("tiny").to_dict().items():
        assert exported[name] == value, name
    assert exported["model_type"] == "megalodon"
    assert config.hidden_size == config.model_dim  # generic tools' names map onto ours


def test_invalid_values_are_refused_with_the_core_message():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MegalodonHFConfig(vocab_size=10, z_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="contradicts share_emb"):
        MegalodonHFConfig(vocab_size=10, share_emb=False, tie_word_embeddings=True)


def test_auto_classes_resolve_ours():
    config = MegalodonHFConfig.from_core(MegalodonConfig.from_preset("tiny", vocab_size=64, chunk_size=8))
    assert AutoConfig.for_model("megalodon", vocab_size=64).__class__ is MegalodonHFConfig
    assert type(AutoModelForCausalLM.from_config(config)) is MegalodonForCausalLM


def test_core_package_imports_without_transformers():
    # Block transformers in a fresh interpreter: the core must import, the adapter must say what is missing.
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import megalodon\n"
        "try:\n"
        "    import megalodon.hf\n"
        "except ImportError as err:\n"
        "    print('refused:', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'megalodon-torch[hf]'" in out.stdout


def test_the_config_class_also_has_the_name_transformers_users_expect():
    from megalodon.hf import MegalodonConfig

    assert MegalodonConfig is MegalodonHFConfig
    with pytest.raises(ValueError, match="describes the 'llama' architecture, not a Megalodon"):
        MegalodonHFConfig(vocab_size=10, architecture="llama")
