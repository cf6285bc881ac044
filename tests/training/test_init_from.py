"""megalodon train --init_from DIR: a run that starts from a trained model's weights, fields and tokenizer."""

import json

import pytest
import torch
from safetensors.torch import load_file

from megalodon import Megalodon, MegalodonConfig
from megalodon.baseline import Llama, matched_llama_config
from megalodon.checkpoint import read_config, save_pretrained
from megalodon.data import ByteTokenizer
from megalodon.training.config import TrainConfig
from megalodon.training.trainer import Trainer, train
from training_helpers import losses

FROM_MODEL = dict(preset="small", tokenizer="bpe")  # the defaults: what init_from replaces (run_values sets others)


@pytest.fixture
def trained(tmp_path):
    """A model directory as a run leaves it (weights, config, tokenizer): the tiny run's model, at its chunk."""
    directory = tmp_path / "pretrained"
    torch.manual_seed(0)
    save_pretrained(Megalodon(MegalodonConfig.from_preset("tiny", vocab_size=259, chunk_size=16)), directory)
    ByteTokenizer().save(directory)
    return directory


def test_a_run_starts_from_the_directorys_weights_and_records_its_model(make_config, trained, tmp_path):
    cfg = make_config(init_from=str(trained), model={"dropout": 0.1}, **FROM_MODEL)
    saved, _ = read_config(trained / "config.json")
    assert cfg.tokenizer == str(trained) and cfg.model["model_dim"] == saved.model_dim and cfg.model["dropout"] == 0.1
    weights = load_file(trained / "model.safetensors")
    with Trainer(cfg, tmp_path / "tuned", progress=False) as trainer:
        state = trainer.model.state_dict()
        assert weights and all(torch.equal(state[name], tensor) for name, tensor in weights.items())
        assert trainer.model.config.dropout == 0.1
    result = train(cfg, tmp_path / "tuned", overwrite=True, progress=False)
    assert result.finished and result.steps == cfg.max_steps
    recorded = json.loads((tmp_path / "tuned" / "train_config.json").read_text())
    assert recorded["init_from"] == str(trained) and recorded["model"] == cfg.model
    assert TrainConfig.from_dict(recorded) == cfg  # what a resumed run rebuilds
    assert "megalodon (from " in (tmp_path / "tuned" / "summary.txt").read_text()


def test_a_run_from_a_model_directory_resumes_from_its_checkpoint(make_config, trained, tmp_path):
    """The checkpoint's weights, not the directory's: the directory may have changed since (here: retrained)."""
    cfg = make_config(init_from=str(trained), **FROM_MODEL)
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "resumed", progress=False, stop_at_step=4)
    config, _ = read_config(trained / "config.json")
    torch.manual_seed(7)
    save_pretrained(Megalodon(config), trained)  # other weights, the same fields and tokenizer
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(straight) == cfg.max_steps and straight == resumed


def test_misuse_of_init_from_is_refused_by_name(make_config, trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="init_from .*nowhere.*no such model directory"):
        make_config(init_from=str(tmp_path / "nowhere"), **FROM_MODEL)
    for option, value in (("preset", "tiny"), ("tokenizer", "byte"), ("arch", "llama")):
        with pytest.raises(ValueError, match=f"TrainConfig.{option} cannot be set with init_from"):
            make_config(init_from=str(trained), **{**FROM_MODEL, option: value})
    hf_layout = tmp_path / "hf"
    hf_layout.mkdir()
    (hf_layout / "config.json").write_text(json.dumps({"architectures": ["MegalodonForCausalLM"]}))
    with pytest.raises(ValueError, match="Hugging Face transformers layout.*convert from-hf"):
        make_config(init_from=str(hf_layout), **FROM_MODEL)
    save_pretrained(Llama(matched_llama_config(MegalodonConfig.from_preset("tiny"))), tmp_path / "llama")
    with pytest.raises(ValueError, match="holds a Llama model: init_from starts Megalodon runs only"):
        make_config(init_from=str(tmp_path / "llama"), **FROM_MODEL)
    wider = make_config(init_from=str(trained), model={"model_dim": 48}, **FROM_MODEL)
    with pytest.raises(ValueError, match="has shape.*changes model.model_dim of init_from's model"):
        train(wider, tmp_path / "wider", progress=False)


def test_compare_and_quick_with_init_from(trained, tmp_path, monkeypatch, capsys):
    """compare trains from scratch, so it refuses init_from; --quick keeps the model and tokenizer it starts from."""
    from megalodon.cli import main

    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i} of a small corpus\n" for i in range(200)))
    assert main(["compare", "--init_from", str(trained), "--data", str(corpus), "--max_steps", "1"]) != 0
    assert "compare trains both models from scratch; drop --init_from" in capsys.readouterr().err
    assert main(["train", "--quick", "--init_from", str(trained), "--data", str(corpus), "--max_steps", "1",
                 "--eval_tokens", "256", "--sample_tokens", "4", "--run-dir", "quick"]) == 0
    assert json.loads((tmp_path / "quick" / "train_config.json").read_text())["tokenizer"] == str(trained)
