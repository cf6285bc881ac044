"""Persistence: transformers save/load, our directory <-> transformers layout, tokenizer export."""

import pytest

pytest.importorskip("transformers")

import json  # noqa: E402

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from helpers import edit_safetensors  # noqa: E402
from megalodon import Megalodon  # noqa: E402
from megalodon.data import BPETokenizer, ByteTokenizer, load_tokenizer  # noqa: E402
from megalodon.hf import MegalodonForCausalLM, export_hf, import_hf, save_hf_tokenizer, wrap  # noqa: E402

TEXTS = ["Hello, world!", "naïve café — 東京 🙂\n\ttabs", "text that spells <eos> and <pad> stays text", ""]


def _assert_same_tensors(a: Megalodon, b: Megalodon):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("share_emb", [False, True])
def test_save_and_load_pretrained_are_bit_exact(make_core, tmp_path, share_emb):
    core = make_core(share_emb=share_emb)
    wrap(core, eos_token_id=257).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "model.embed.weight" in keys
    assert ("model.output.output.weight" in keys) == (not share_emb)  # a tied tensor is stored once

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is MegalodonForCausalLM
    assert (loaded.model.output.output.weight is loaded.model.embed.weight) == share_emb
    _assert_same_tensors(core, loaded.model)
    ids = torch.randint(0, 256, (2, 19))
    assert torch.equal(loaded(ids).logits, core(ids))


@pytest.mark.parametrize("share_emb", [False, True])
def test_our_directory_round_trips_through_the_hf_layout(make_core, tmp_path, share_emb):
    core = make_core(share_emb=share_emb)
    core.save_pretrained(tmp_path / "ours")
    ByteTokenizer().save(tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "hf", tokenizer=tmp_path / "ours")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["eos_token_id"], config["pad_token_id"]) == ("megalodon", 257, 258)

    back = import_hf(tmp_path / "hf")
    assert type(back) is Megalodon and back.config == core.config
    _assert_same_tensors(core, back)
    back.save_pretrained(tmp_path / "again")
    original = load_file(str(tmp_path / "ours" / "model.safetensors"))
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


def test_import_refuses_a_directory_missing_tensors(core, tmp_path):
    wrap(core).save_pretrained(tmp_path)
    edit_safetensors(tmp_path / "model.safetensors", lambda tensors: tensors.pop("model.layers.1.mega.wz.weight"),
                     metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing_keys.*layers.1.mega.wz.weight"):
        import_hf(tmp_path)


def test_byte_tokenizer_exports_an_equivalent_fast_tokenizer(core, tmp_path):
    ours = ByteTokenizer()
    export_hf(core, tmp_path, tokenizer=ours)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (256, 257, 258)
    assert theirs.padding_side == "left"
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids
        assert theirs.decode(ids) == ours.decode(ids) == text
    assert theirs.decode([72, 105, 257], skip_special_tokens=True) == "Hi"
    assert load_tokenizer(tmp_path).encode(TEXTS[1]) == ours.encode(TEXTS[1])  # our loader reads it back


def test_bpe_tokenizer_exports_with_its_special_tokens(tmp_path):
    corpus = ["the cat sat on the mat", "the dog sat on the log", "naïve café 東京"] * 20
    ours = BPETokenizer.train(corpus, vocab_size=300)
    ours.save(tmp_path / "tok")
    save_hf_tokenizer(tmp_path / "tok", tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.eos_token == "<eos>" and theirs.eos_token_id == ours.eos_id
    assert (theirs.bos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.pad_id)
    for text in TEXTS + corpus[:3]:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids
        assert theirs.decode(ids) == ours.decode(ids)



# ---- both layouts, and the commands between them ------------------------------------------------------------------
def test_auto_model_reads_our_model_directory(core, tmp_path):
    core.save_pretrained(tmp_path / "ours")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert type(loaded) is MegalodonForCausalLM
    ids = torch.randint(0, 256, (2, 11))
    assert torch.equal(loaded(ids).logits, core(ids))


def test_our_loaders_name_the_convert_command_for_a_transformers_directory(core, tmp_path, capsys):
    from megalodon.cli import main

    export_hf(core, tmp_path / "hf", tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match="Hugging Face transformers layout.*megalodon convert from-hf"):
        Megalodon.from_pretrained(tmp_path / "hf")
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "Hi", "--max-new-tokens", "2"]) == 2
    assert "megalodon convert from-hf" in capsys.readouterr().err


def test_convert_from_hf_keeps_the_tokenizer(core, tmp_path, capsys):
    from megalodon.cli import main

    core.save_pretrained(tmp_path / "ours")
    ByteTokenizer().save(tmp_path / "ours")
    assert main(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert isinstance(load_tokenizer(tmp_path / "back"), ByteTokenizer)
    outputs = []
    for directory in ("ours", "back"):
        capsys.readouterr()
        assert main(["generate", str(tmp_path / directory), "--prompt", "Hi", "--max-new-tokens", "8", "--seed",
                     "1"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_convert_to_hf_without_transformers_names_the_install_step(core, tmp_path):
    import subprocess
    import sys

    core.save_pretrained(tmp_path / "ours")
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from megalodon.cli import main\n"
            f"sys.exit(main(['convert', 'to-hf', {str(tmp_path / 'ours')!r}, {str(tmp_path / 'hf')!r}]))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "pip install 'megalodon-torch[hf]'" in run.stderr and "Traceback" not in run.stderr


def test_what_does_not_fit_the_export_is_refused_before_anything_is_written(make_core, tmp_path):
    from megalodon.hf import to_hf_tokenizer

    with pytest.raises(TypeError, match="expected a megalodon.Megalodon, got Linear"):
        wrap(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="the tokenizer has 259 ids but the model's vocab_size is 200"):
        export_hf(make_core(vocab_size=200), tmp_path / "out", tokenizer=ByteTokenizer())
    assert not (tmp_path / "out").exists()
    with pytest.raises(TypeError, match="cannot export a dict: expected a ByteTokenizer or BPETokenizer"):
        to_hf_tokenizer({})
