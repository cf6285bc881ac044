"""--val_data: validation on documents of your own (a benchmark's official split), with all of --data training."""

import json

import pytest

from megalodon.training.data import open_splits, prepare_data
from megalodon.training.trainer import train


@pytest.fixture
def held_out(tmp_path):
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": f"held-out document {i}: " + "a lazy fox sings. " * (20 + i)}) + "\n"
                            for i in range(3)))
    return path


def texts(store, tokenizer) -> list[str]:
    return [tokenizer.decode(store.document(i)) for i in range(store.n_docs)]


def test_val_data_is_the_validation_and_every_document_of_data_trains(make_config, corpus, held_out, tmp_path):
    cfg = make_config(val_data=str(held_out), max_steps=2, checkpoint_every=0)
    store_dir, tokenizer = prepare_data(cfg)
    train_split, val_split = open_splits(cfg, store_dir, tokenizer)
    assert sorted(texts(train_split, tokenizer)) == sorted(p.read_text() for p in corpus.iterdir())
    assert texts(val_split, tokenizer) == [json.loads(line)["text"] for line in held_out.read_text().splitlines()]
    default_dir, _ = prepare_data(make_config())
    assert default_dir != store_dir  # the default run's store keeps its split
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.finished and result.val_bpb > 0
    with pytest.raises(FileNotFoundError, match="val_data .*nowhere.*no such file or directory"):
        prepare_data(make_config(val_data=str(tmp_path / "nowhere")))


def test_a_run_refuses_to_resume_when_its_validation_files_changed(make_config, held_out, tmp_path):
    cfg = make_config(val_data=str(held_out), checkpoint_every=2)
    train(cfg, tmp_path / "run", progress=False, stop_at_step=2)
    held_out.write_text(held_out.read_text().replace("lazy", "quick"))
    with pytest.raises(ValueError, match="the training data changed since"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
