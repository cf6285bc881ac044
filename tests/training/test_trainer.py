"""The trainer end to end on a tiny model: exact resume, refused corruption, clear errors."""

import json

import pytest

from megalodon.training.checkpoint import list_checkpoints
from megalodon.training.config import TrainConfig
from megalodon.training.trainer import train


@pytest.fixture
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    words = "the quick brown fox jumps over a lazy dog while seven bold wizards quietly hum".split()
    for i in range(6):
        text = "\n".join(" ".join(words[(i + j + k) % len(words)] for k in range(9)) for j in range(40))
        (root / f"doc{i}.txt").write_text(text)
    return root


def config(corpus, tmp_path, **overrides):
    values = dict(preset="tiny", data=str(corpus), data_dir=str(tmp_path / "data"), tokenizer="byte", seq_len=64,
                  batch_size=4, grad_accum=2, max_steps=8, warmup_steps=3, eval_every=0, checkpoint_every=4,
                  log_every=1, dtype="fp32", sample_tokens=8, model={"chunk_size": 16}, lr=3e-3)
    values.update(overrides)
    return TrainConfig(**values)


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def test_resume_continues_exactly(corpus, tmp_path):
    cfg = config(corpus, tmp_path)
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "resumed", progress=False, stop_at_step=4)
    assert len(losses(tmp_path / "resumed")) == 4
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(straight) == len(resumed) == 8
    assert max(abs(a - b) for a, b in zip(straight, resumed)) < 1e-6
    run = tmp_path / "resumed"
    assert (run / "loss.png").is_file() and (run / "summary.txt").is_file() and (run / "model").is_dir()


def test_corrupt_checkpoint_is_refused_and_the_previous_one_kept(corpus, tmp_path):
    cfg = config(corpus, tmp_path)
    train(cfg, tmp_path / "run", progress=False)
    first, latest = list_checkpoints(tmp_path / "run")[-2:]
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    with pytest.raises(ValueError, match="does not match its recorded size/hash.*previous checkpoint"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
    assert (first / "manifest.json").is_file()


def test_llama_baseline_trains_on_the_same_tokens(corpus, tmp_path):
    result = train(config(corpus, tmp_path, arch="llama", max_steps=4), tmp_path / "llama", progress=False)
    assert result.steps == 4 and result.val_bpb > 0
    assert json.loads((tmp_path / "llama" / "model" / "config.json").read_text())["architecture"] == "llama"


def test_a_different_run_in_the_directory_is_refused(corpus, tmp_path):
    train(config(corpus, tmp_path, max_steps=2), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        train(config(corpus, tmp_path, max_steps=2), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="different run.*lr"):
        train(config(corpus, tmp_path, max_steps=2, lr=1e-4), tmp_path / "run", resume=True, progress=False)


def test_bad_data_and_vocab_are_refused(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        train(config(corpus, tmp_path, data=str(tmp_path / "nothing")), tmp_path / "a", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(ValueError, match="documents|text"):
        train(config(corpus, tmp_path, data=str(empty)), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        train(config(corpus, tmp_path, model={"chunk_size": 16, "vocab_size": 300}), tmp_path / "c",
              progress=False)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        train(config(corpus, tmp_path, seq_len=40), tmp_path / "d", progress=False)


def test_cli_quick_run_and_clear_errors(corpus, tmp_path, capsys):
    from megalodon.cli import main

    args = ["train", "--quick", "--run-dir", str(tmp_path / "cli"), "--data", str(corpus), "--data_dir",
            str(tmp_path / "data"), "--max_steps", "3", "--model.chunk_size", "16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "validation bits/byte" in out and (tmp_path / "cli" / "loss.png").is_file()
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--quick", "--max_stesp", "3"]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err


def test_activation_checkpointing_does_not_change_the_losses(corpus, tmp_path):
    plain = train(config(corpus, tmp_path, max_steps=3), tmp_path / "plain", progress=False)
    recomputed = train(config(corpus, tmp_path, max_steps=3, activation_checkpointing=True), tmp_path / "ckpt",
                       progress=False)
    assert abs(plain.val_loss - recomputed.val_loss) < 1e-6
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "plain"), losses(tmp_path / "ckpt"))) < 1e-6


def test_a_time_budget_fixes_max_steps_at_the_end_of_warmup(corpus, tmp_path):
    cfg = config(corpus, tmp_path, max_steps=0, time_budget_min=0.02, warmup_steps=6, checkpoint_every=0)
    result = train(cfg, tmp_path / "budget", progress=False)
    assert result.steps >= 7 and result.val_bpb > 0
    state = json.loads((list_checkpoints(tmp_path / "budget")[-1] / "trainer_state.json").read_text())
    assert state["max_steps"] == result.steps
