"""eval_tokens caps each validation run (what keeps `megalodon train --quick` quick), and 0 reads the whole split."""

import pytest

from megalodon.data import TokenStore
from megalodon.training import compute
from megalodon.training.commands import QUICK
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
    cfg = trainer.cfg.__class__.from_dict({**trainer.cfg.to_dict(), "eval_tokens": eval_tokens})
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


def test_quick_sets_a_cap():
    assert 0 < QUICK["eval_tokens"] <= 8192 and QUICK["max_steps"] <= 50
