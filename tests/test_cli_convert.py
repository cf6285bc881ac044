"""`megalodon convert` in every direction, round trips bit-exact."""

import pytest
import torch

from helpers import tiny_model
from megalodon import Megalodon
from megalodon.cli import main


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_reference_round_trip(tmp_path, suffix):
    model = tiny_model(torch.float32, share_emb=True)
    model.save_pretrained(tmp_path / "ours")
    assert main(["convert", "to-reference", str(tmp_path / "ours"), str(tmp_path / f"ref{suffix}")]) == 0
    assert main(["convert", "from-reference", str(tmp_path / f"ref{suffix}"), str(tmp_path / "back"),
                 "--config", str(tmp_path / "ours" / "config.json")]) == 0
    ids = torch.randint(0, 64, (2, 17))
    assert torch.equal(Megalodon.from_pretrained(tmp_path / "back")(ids), model(ids))


def test_missing_config_is_a_clear_error(tmp_path, capsys):
    assert main(["convert", "from-reference", str(tmp_path / "x.pth"), str(tmp_path / "out")]) == 2
    assert "needs --config" in capsys.readouterr().err


def test_from_reference_saves_the_tokenizer_it_is_given(tmp_path, capsys):
    """Reference checkpoints come without a tokenizer: --tokenizer puts one beside the imported weights, so that
    generate can run on the result; one with more tokens than the embedding is refused by name."""
    from megalodon.data import ByteTokenizer, load_tokenizer

    model = tiny_model(torch.float32, vocab_size=259)
    model.save_pretrained(tmp_path / "ours")
    ByteTokenizer().save(tmp_path / "tokenizer")
    assert main(["convert", "to-reference", str(tmp_path / "ours"), str(tmp_path / "ref.pth")]) == 0
    config = str(tmp_path / "ours" / "config.json")
    assert main(["convert", "from-reference", str(tmp_path / "ref.pth"), str(tmp_path / "back"), "--config", config,
                 "--tokenizer", str(tmp_path / "tokenizer")]) == 0
    assert "with tokenizer" in capsys.readouterr().out
    assert isinstance(load_tokenizer(tmp_path / "back"), ByteTokenizer)
    assert main(["generate", str(tmp_path / "back"), "--prompt", "a", "--max-new-tokens", "2"]) == 0

    small = tiny_model(torch.float32, vocab_size=64)
    small.save_pretrained(tmp_path / "small")
    assert main(["convert", "to-reference", str(tmp_path / "small"), str(tmp_path / "small.pth")]) == 0
    assert main(["convert", "from-reference", str(tmp_path / "small.pth"), str(tmp_path / "out"), "--config",
                 str(tmp_path / "small" / "config.json"), "--tokenizer", str(tmp_path / "tokenizer")]) == 2
    assert "has 259 tokens but the model's embedding holds 64" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_reference_options_are_refused_in_other_directions(tmp_path, capsys):
    tiny_model(torch.float32).save_pretrained(tmp_path / "ours")
    assert main(["convert", "to-reference", str(tmp_path / "ours"), str(tmp_path / "ref.pth"), "--config",
                 "tiny"]) == 2
    assert "--config applies to from-reference only" in capsys.readouterr().err
    assert not (tmp_path / "ref.pth").exists()


def test_hf_round_trip(tmp_path):
    pytest.importorskip("transformers")
    from megalodon.data import ByteTokenizer

    model = tiny_model(torch.float32, vocab_size=259)
    model.save_pretrained(tmp_path / "ours")
    ByteTokenizer().save(tmp_path / "ours")
    assert main(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    ids = torch.randint(0, 259, (2, 17))
    assert torch.equal(Megalodon.from_pretrained(tmp_path / "back")(ids), model(ids))


def _reference_file(tmp_path, **overrides):
    model = tiny_model(torch.float32, **overrides)
    model.save_pretrained(tmp_path / "ours")
    main(["convert", "to-reference", str(tmp_path / "ours"), str(tmp_path / "ref.pth")])
    return tmp_path / "ref.pth", tmp_path / "ours" / "config.json"


def test_an_existing_model_directory_is_kept_without_overwrite(tmp_path, capsys):
    from megalodon.data import ByteTokenizer

    reference, config = _reference_file(tmp_path)
    existing = tmp_path / "existing"
    tiny_model(torch.float32, seed=3).save_pretrained(existing)
    ByteTokenizer().save(existing)
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    assert main(["convert", "from-reference", str(reference), str(existing), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(existing) in err
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    # With --overwrite the directory is replaced whole: no tokenizer of the old model is left beside the new one.
    assert main(["convert", "from-reference", str(reference), str(existing), "--config", str(config),
                 "--overwrite"]) == 0
    assert not (existing / "tokenizer_config.json").exists()
    ids = torch.randint(0, 64, (1, 9))
    assert torch.equal(Megalodon.from_pretrained(existing)(ids), Megalodon.from_pretrained(tmp_path / "ours")(ids))


def test_overwrite_never_empties_a_directory_that_is_not_a_model(tmp_path, capsys):
    reference, config = _reference_file(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.txt").write_text("years of work")
    assert main(["convert", "from-reference", str(reference), str(home), "--config", str(config),
                 "--overwrite"]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert (home / "thesis.txt").read_text() == "years of work"


def test_an_existing_reference_file_is_kept_without_overwrite(tmp_path, capsys):
    tiny_model(torch.float32).save_pretrained(tmp_path / "ours")
    target = tmp_path / "ref.pth"
    target.write_bytes(b"precious")
    assert main(["convert", "to-reference", str(tmp_path / "ours"), str(target)]) == 2
    assert "--overwrite" in capsys.readouterr().err and target.read_bytes() == b"precious"
    assert main(["convert", "to-reference", str(tmp_path / "ours"), str(target), "--overwrite"]) == 0
    assert target.read_bytes() != b"precious"
