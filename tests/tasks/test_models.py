"""Task models: the classification head, the real-EMA ablation, windowed losses, streamed scoring, save/load."""

import numpy as np
import pytest
import torch

from megalodon.tasks import (AssociativeRecall, ListOps, SequenceClassifier, build_task_model, collate,
                             load_task_model, predict, save_task_model, task_loss)
from megalodon.tasks import train as task_train
from megalodon.tasks.models import REAL_EMA_THETA

from tasks.task_helpers import config


@pytest.mark.parametrize("arch", ["megalodon", "llama"])
def test_classifier_gradients_reach_head_and_trunk(arch):
    task = ListOps(length=(5, 40))
    model = build_task_model(task, config(arch=arch))
    assert isinstance(model, SequenceClassifier)
    batch = collate(task.examples("train", 4), task)
    logits = model(batch.input_ids, batch.lengths)
    assert logits.shape == (4, 10)
    torch.nn.functional.cross_entropy(logits, batch.labels).backward()
    embed = model.backbone.embed if arch == "megalodon" else model.backbone.embed_tokens
    grads = [model.head.weight.grad, embed.weight.grad]
    if arch == "megalodon":
        grads.append(model.backbone.layers[0].mega.cema.alpha.grad)
    for grad in grads:
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["megalodon", "llama"])
def test_classifier_reads_each_rows_last_token_whatever_the_padding(arch):
    task = ListOps(length=(5, 40))
    model = build_task_model(task, config(arch=arch)).eval()
    short, long = sorted(task.examples("test", 2), key=lambda e: len(e.tokens))
    alone = collate([short], task)
    padded = collate([short, long], task)
    assert padded.input_ids.shape[1] > alone.input_ids.shape[1]
    torch.testing.assert_close(model(alone.input_ids, alone.lengths)[0], model(padded.input_ids, padded.lengths)[0])
    with pytest.raises(ValueError, match="lengths must be"):
        model(alone.input_ids, alone.lengths + 1)


def test_real_ema_pins_every_angle_and_keeps_it_through_training():
    task = AssociativeRecall(num_pairs=2, gap=(0, 20))
    model = build_task_model(task, config(), ema="real")
    cemas = [block.mega.cema for block in model.layers]
    for cema in cemas:
        assert not cema.theta.requires_grad and bool((cema.theta == REAL_EMA_THETA).all())
        coefficients = cema.coefficients()
        assert bool((coefficients.phi == 0).all()) and bool((coefficients.q.imag == 0).all())
    alpha = cemas[0].alpha.detach().clone()
    task_train.train_task(model, task, config(max_steps=2))
    assert bool((cemas[0].theta == REAL_EMA_THETA).all())
    assert not torch.equal(cemas[0].alpha, alpha)  # the rest trains
    complex_model = build_task_model(task, config())
    assert bool((complex_model.layers[0].mega.cema.coefficients().phi != 0).any())
    with pytest.raises(ValueError, match="ablation"):
        build_task_model(task, config(arch="llama"), ema="real")


def test_stateful_windows_see_the_same_loss_as_one_call_and_stateless_windows_do_not():
    task = AssociativeRecall(num_pairs=4, gap=(20, 30))
    batch = collate(task.examples("train", 3), task)
    losses = {}
    for name, cfg in {"whole": config(seq_len=1024), "stateful": config(seq_len=8),
                      "stateless": config(seq_len=8, stateful=False)}.items():
        model = build_task_model(task, cfg).double()
        losses[name] = task_loss(model, batch, task, cfg)
        assert model.embed.weight.grad is not None
    assert losses["stateful"] == pytest.approx(losses["whole"], rel=1e-10)
    assert abs(losses["stateless"] - losses["whole"]) > 1e-3


@pytest.mark.parametrize("arch", ["megalodon", "llama"])
def test_scoring_in_blocks_equals_one_call(arch, monkeypatch):
    task = AssociativeRecall(num_pairs=3, gap=(30, 60))
    model = build_task_model(task, config(arch=arch)).double().eval()
    examples = task.examples("test", 3)
    batch = collate(examples, task)
    with torch.no_grad():
        whole = model(batch.input_ids).argmax(-1).numpy()
    monkeypatch.setattr(task_train, "EVAL_BLOCK", 16)
    guesses = predict(model, task, examples, batch_size=2)
    for row, example in enumerate(examples):
        assert np.array_equal(guesses[row], whole[row, example.answers - 1])


@pytest.mark.parametrize("task", [AssociativeRecall(num_pairs=2, gap=(0, 9)), ListOps(length=(5, 20))],
                         ids=lambda t: t.name)
def test_task_model_round_trip(task, tmp_path):
    cfg = config()
    model = build_task_model(task, cfg, ema="real" if task.name == "recall" else "complex")
    examples = task.examples("test", 4)
    save_task_model(tmp_path, model, task, cfg, "real" if task.name == "recall" else "complex", {"note": 1})
    loaded, loaded_task, loaded_cfg, meta = load_task_model(tmp_path)
    assert loaded_task.settings() == task.settings() and loaded_cfg == cfg and meta["results"] == {"note": 1}
    for a, b in zip(predict(model, task, examples), predict(loaded, loaded_task, examples)):
        assert np.array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="not a task model directory"):
        load_task_model(tmp_path / "nothing")



def test_a_task_step_reads_the_device_once(monkeypatch):
    """Which windows hold answers is read from the batch's host copy, and the step's loss is read with its gradient
    norm in one go: the reads are the batch's width as it is collated, its answer count and one flag a window (all
    of the host copy), and that one read, where each window's loss and the norm were read apart (each a wait for a
    GPU)."""
    from host_syncs import counted_host_syncs, device_value_checks

    device_value_checks(monkeypatch)
    task = AssociativeRecall(num_pairs=4, gap=(20, 30))
    cfg = config(seq_len=8, max_steps=1, log_every=1)
    model = build_task_model(task, cfg)
    windows = -(-collate(task.examples("train", cfg.batch_size, cfg.seed), task).input_ids.shape[1] // cfg.seq_len)
    with counted_host_syncs() as found:
        records = task_train.train_task(model, task, cfg)
    assert windows >= 4 and len(found) == 2 + windows + 1, (windows, found)
    assert np.isfinite(records[0]["loss"])
