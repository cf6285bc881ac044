"""Model directories and sessions carry SHA-256 checksums: damage is refused on load, never turned into garbage
text; non-finite weights are refused; old files without checksums still load, with a note."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import edit_safetensors
from megalodon.checkpoint import CHECKSUMS_NAME, load_pretrained, save_pretrained
from megalodon.cli import main
from megalodon.inference import SamplingConfig, generate, load_session, save_session
from megalodon.inference.session import CHECKSUM_KEY


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # inside the last tensor's data: the file still parses
    path.write_bytes(bytes(data))


def test_a_model_directory_lists_the_checksum_of_every_file(model_dir):
    checksums = json.loads((model_dir / CHECKSUMS_NAME).read_text())
    assert sorted(checksums["files"]) == ["config.json", "model.safetensors"]
    assert all(len(entry["sha256"]) == 64 for entry in checksums["files"].values())


def test_flipped_weight_bytes_are_refused(model_dir, capsys):
    flip_last_byte(model_dir / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors.*does not match"):
        load_pretrained(model_dir)
    assert main(["generate", str(model_dir), "--prompt", "hi", "--max-new-tokens", "3"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "does not match" in captured.err and "Traceback" not in captured.err


def test_an_edited_config_and_a_truncated_file_are_refused(model_dir, model_factory, tmp_path):
    config = model_dir / "config.json"
    config.write_text(config.read_text().replace('"dropout": 0.0', '"dropout": 0.5'))
    with pytest.raises(ValueError, match="config.json does not match"):
        load_pretrained(model_dir)
    save_pretrained(model_factory(dtype=torch.float32), tmp_path / "again")
    weights = tmp_path / "again" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="does not match"):
        load_pretrained(tmp_path / "again")


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"files": {"model.safetensors": 5}}', "{}"])
def test_a_malformed_checksum_file_is_named(model_dir, text):
    (model_dir / CHECKSUMS_NAME).write_text(text)
    with pytest.raises(ValueError, match=CHECKSUMS_NAME):
        load_pretrained(model_dir)


def test_a_directory_without_checksums_loads_with_a_note(model_dir, capsys):
    (model_dir / CHECKSUMS_NAME).unlink()
    with pytest.warns(UserWarning, match="no checksums"):
        load_pretrained(model_dir)
    assert main(["generate", str(model_dir), "--prompt", "hi", "--max-new-tokens", "1"]) == 0
    assert "note: " in capsys.readouterr().err


def test_non_finite_weights_are_refused(model_dir, model_factory, tmp_path, capsys):
    weights = model_dir / "model.safetensors"
    name = sorted(load_file(str(weights)))[3]
    edit_safetensors(weights, lambda tensors: tensors[name].fill_(float("nan")), metadata={"format": "pt"})
    (model_dir / CHECKSUMS_NAME).unlink()  # an old directory: nothing else would stop it
    with pytest.raises(ValueError, match=f"non-finite.*{name}"), pytest.warns(UserWarning, match="no checksums"):
        load_pretrained(model_dir)
    assert main(["generate", str(model_dir), "--prompt", "hi"]) == 2
    assert "non-finite" in capsys.readouterr().err
    model = model_factory()
    with torch.no_grad():
        model.embed.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        save_pretrained(model, tmp_path / "diverged")
    assert not (tmp_path / "diverged" / "model.safetensors").exists()


def _session(model, tokenizer, tmp_path):
    result, = generate(model, tokenizer, ["hello"], SamplingConfig(temperature=0, max_new_tokens=3))
    path = tmp_path / "chat.session"
    save_session(path, result.session, model, tokenizer)
    return path


def test_a_damaged_session_is_refused(model, tokenizer, tmp_path, model_dir, capsys):
    path = _session(model, tokenizer, tmp_path)
    flip_last_byte(path)
    with pytest.raises(ValueError, match="damaged"):
        load_session(path, model, tokenizer)
    cli_session = tmp_path / "cli.session"
    assert main(["generate", str(model_dir), "--prompt", "hi", "--max-new-tokens", "2", "--session-out",
                 str(cli_session)]) == 0
    flip_last_byte(cli_session)
    capsys.readouterr()
    assert main(["generate", str(model_dir), "--session-in", str(cli_session), "--max-new-tokens", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "damaged" in captured.err


def test_an_edited_session_record_is_refused(model, tokenizer, tmp_path):
    path = _session(model, tokenizer, tmp_path)
    data = path.read_bytes()
    edited = data.replace(b'\\"truncate_chunks\\": null', b'\\"truncate_chunks\\": 999 ')
    assert edited != data
    path.write_bytes(edited)
    with pytest.raises(ValueError, match="damaged"):
        load_session(path, model, tokenizer)


def test_an_old_session_without_a_checksum_loads_with_a_note(model, tokenizer, tmp_path):
    from safetensors import safe_open

    path = _session(model, tokenizer, tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    del metadata[CHECKSUM_KEY]
    edit_safetensors(path, lambda tensors: None, metadata=metadata)
    with pytest.warns(UserWarning, match="checksums"):
        session = load_session(path, model, tokenizer)
    assert session.position == 8
