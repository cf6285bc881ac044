"""eval_tokens caps each validation run (what keeps `megalodon train --quick` quick), and 0 reads the whole split."""

import pytest

from megalodon.data import TokenStore
from megalodon.training import compute
from megalodon.training.commands import QUICK
from megalodon.training.config import TrainConfig
from megalodon.training.trainer import Trainer


@pytest.fixture
def trainer(make_config, tmp_path):
    with Trainer(make_config(seq_len=32, eval_batch_size=2), tmp_path / "run", progress=False) as t:
        yield t


def labels_read(monkeypatch, trainer, eval_tokens):
    """Validation labels that evaluate() fed through the model with this cap, and its result."""
    read = []
    forward = compute.forward_loss

    def counting(model, batch, state, stateful):
        read.append(int((batch.labels != -100).sum()))
        return forward(model, batch, state, stateful)

    monkeypatch.setattr(compute, "forward_loss", counting)
    cfg = TrainConfig.from_dict({**trainer.cfg.to_dict(), "eval_tokens": eval_tokens})
    result = compute.evaluate(trainer.model, trainer.val_store, cfg, trainer.chunk, trainer.pad_id, trainer.device)
    return sum(read), result


def test_the_cap_stops_evaluation_after_that_many_labels(monkeypatch, trainer):
    store: TokenStore = trainer.val_store
    whole, full = labels_read(monkeypatch, trainer, 0)
    assert whole == store.n_tokens - store.n_docs  # every label once: the first token of a document has none
    per_batch = 2 * 32
    assert whole > 3 * per_batch  # the corpus is long enough for the cap to matter
    read, capped = labels_read(monkeypatch, trainer, per_batch + 1)
    assert per_batch < read <= 2 * per_batch  # stops at the first batch boundary past the cap
    assert capped["val_bpb"] != full["val_bpb"]
    above, same = labels_read(monkeypatch, trainer, 10 * whole)
    assert above == whole and same == full  # a cap beyond the split changes nothing, to the bit


def test_quick_caps_every_evaluation_of_the_run(tmp_path, monkeypatch, capsys):
    from megalodon.cli import main

    corpus = tmp_path / "corpus"  # every document longer than the cap, so that a whole-split read would show
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "a long line of plain words. " * 400)
    evaluated = []  # labels read by each evaluation of the run
    forward, evaluate = compute.forward_loss, compute.evaluate

    def counting(model, batch, state, stateful):
        evaluated[-1] += int((batch.labels != -100).sum())
        return forward(model, batch, state, stateful)

    def one_evaluation(*args, **kwargs):
        evaluated.append(0)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr("megalodon.training.trainer.evaluate", one_evaluation)
    monkeypatch.setattr(compute, "forward_loss", counting)
    assert main(["train", "--quick", "--data", str(corpus), "--data-dir", str(tmp_path / "data"), "--run-dir",
                 str(tmp_path / "run"), "--max-steps", "2", "--model.chunk-size", "16"]) == 0
    store = TokenStore(next((tmp_path / "data" / "stores").glob("*/meta.json")).parent, "val")
    assert store.n_tokens > 2 * QUICK["eval_tokens"]
    assert evaluated and all(QUICK["eval_tokens"] <= n < QUICK["eval_tokens"] + 4 * 128 for n in evaluated), evaluated
