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
