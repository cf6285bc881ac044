"""--dtype fp16: autocast in fp16 with dynamic loss scaling (training/loss_scaling.py), on the CPU.

The runs start from a loss scale of 2^20, which this tiny model's gradients overflow in fp16 at the first two
steps (2^18 fits): the scale's whole cycle (overflow, skip, halve, train on) happens within a few steps."""

import json
import math

import pytest
import torch
from host_syncs import counted_host_syncs, device_value_checks

from megalodon.training import loss_scaling
from megalodon.training.compute import precision_notes
from megalodon.training.trainer import Trainer, train
from training_helpers import losses, strict_records


@pytest.fixture
def large_initial_scale(monkeypatch):
    monkeypatch.setattr(loss_scaling, "INITIAL_SCALE", 2.0 ** 20)


def step_records(run_dir) -> list[dict]:
    return [r for r in strict_records(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("arch", ["megalodon", "llama"])
def test_fp16_trains_as_fp32_does(make_config, tmp_path, arch):
    fp32 = train(make_config(arch=arch), tmp_path / "fp32", progress=False)
    fp16 = train(make_config(arch=arch, dtype="fp16"), tmp_path / "fp16", progress=False)
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "fp32"), losses(tmp_path / "fp16"))) < 2e-3
    assert abs(fp32.val_loss - fp16.val_loss) < 2e-3
    records = step_records(tmp_path / "fp16")
    assert [r["loss_scale"] for r in records] == [2.0 ** 16] * 8 and records[-1]["skipped_steps"] == 0
    assert "loss_scale" not in step_records(tmp_path / "fp32")[0]  # only fp16 runs have one
    summary = (tmp_path / "fp16" / "summary.txt").read_text()
    assert "precision  fp16 autocast, loss scale 65536, 0 steps skipped\n" in summary
    assert "precision  fp32\n" in (tmp_path / "fp32" / "summary.txt").read_text()


def test_an_overflow_skips_the_step_and_halves_the_scale(make_config, tmp_path, large_initial_scale):
    with Trainer(make_config(dtype="fp16"), tmp_path / "run", progress=False) as trainer:
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        first_batch = trainer.batcher.state_dict()
        loss = trainer.train_step()
        assert math.isfinite(loss) and not math.isfinite(trainer.grad_norm) and trainer.loss_scale == 2.0 ** 20
        after = trainer.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # the weights are untouched
        assert not trainer.optimizer.state and all(p.grad is None for p in trainer.model.parameters())
        assert trainer.step == 1 and trainer.batcher.state_dict() != first_batch  # the data moved on
        assert trainer.loss_scaling.scaler.get_scale() == 2.0 ** 19 and trainer.loss_scaling.skipped == 1
        while trainer.loss_scaling.skipped < 3 and trainer.step < 6:
            trainer.train_step()
        assert trainer.loss_scaling.skipped == 2 and trainer.loss_scale == 2.0 ** 18  # it fits from here
        assert math.isfinite(trainer.grad_norm) and trainer.optimizer.state
        assert not all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_a_resumed_fp16_run_continues_with_the_saved_scale(make_config, tmp_path, large_initial_scale):
    cfg = make_config(dtype="fp16")
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "resumed", progress=False, stop_at_step=4)
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    straight, resumed = step_records(tmp_path / "straight"), step_records(tmp_path / "resumed")
    assert [r["loss_scale"] for r in straight] == [2.0 ** 20, 2.0 ** 19] + [2.0 ** 18] * 6
    assert [(r["loss"], r["loss_scale"], r["skipped_steps"]) for r in straight] == \
        [(r["loss"], r["loss_scale"], r["skipped_steps"]) for r in resumed]  # to the bit
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("straight", "resumed")]
    assert summaries[0]["precision"] == "fp16" and summaries[0]["skipped_steps"] == 2
    assert all(s["loss_scale"] == 2.0 ** 18 and s["skipped_steps"] == 2 for s in summaries)


def test_a_scale_that_keeps_falling_stops_the_run(make_config, tmp_path, large_initial_scale, monkeypatch):
    monkeypatch.setattr(loss_scaling, "MIN_SCALE", 2.0 ** 19)
    with pytest.raises(RuntimeError, match=r"training diverged at step 2: the gradients overflow fp16 even at a "
                                           r"loss scale of 5.24e\+05"):
        train(make_config(dtype="fp16"), tmp_path / "run", progress=False)


def test_a_loss_that_overflows_names_fp16(make_config, tmp_path, monkeypatch):
    from megalodon.training import trainer as trainer_module

    forward_loss = trainer_module.forward_loss
    monkeypatch.setattr(trainer_module, "forward_loss", lambda *args: (lambda loss, state: (loss * math.inf, state))(
        *forward_loss(*args)))
    with pytest.raises(RuntimeError, match=r"the loss is inf .*fp16's range \(65504\).* --dtype bf16"):
        train(make_config(dtype="fp16"), tmp_path / "fp16", progress=False)
    with pytest.raises(RuntimeError, match=r"the loss is inf .*and start again$"):
        train(make_config(), tmp_path / "fp32", progress=False)


def test_an_fp16_step_waits_for_the_device_once(make_config, tmp_path, monkeypatch):
    """The loss scale is read with the loss and the gradient norm: no more waits than an fp32 step."""
    device_value_checks(monkeypatch)
    with Trainer(make_config(dtype="fp16", grad_accum=4), tmp_path / "run", progress=False) as trainer:
        trainer.train_step()
        with counted_host_syncs() as found:
            trainer.train_step()
    assert len(found) == 2 and math.isfinite(trainer.grad_norm), found


def test_what_each_device_is_told_about_its_precision(make_config, monkeypatch):
    assert "emulated" in precision_notes(make_config(dtype="fp16"), torch.device("cpu"))[0]
    assert precision_notes(make_config(dtype="auto"), torch.device("cpu")) == []
    from megalodon.training import compute

    monkeypatch.setattr(compute, "fast_bf16", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    (note,) = precision_notes(make_config(dtype="auto"), torch.device("cuda"))
    assert note.startswith("Tesla T4 has no bf16 tensor cores") and "--dtype fp16" in note
    assert precision_notes(make_config(dtype="fp32"), torch.device("cuda")) == []
    with pytest.raises(ValueError, match=r"dtype must be one of \('auto', 'bf16', 'fp16', 'fp32'\)"):
        make_config(dtype="float16")
