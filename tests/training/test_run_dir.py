"""The run directory: one trainer at a time, atomic rewrites, crash leftovers cleaned, honest resume."""

import math
import os
import sys
import types

import pytest
import torch

from megalodon.training.checkpoint import list_checkpoints, save_checkpoint
from megalodon.training.report import read_metrics
from megalodon.training.run_dir import RunDirLock, RunInUse
from megalodon.training.trainer import Trainer, train
from training_helpers import losses, strict_records


def test_a_locked_run_directory_is_refused_and_never_deleted(make_config, tmp_path):
    run = tmp_path / "run"
    train(make_config(max_steps=2), run, progress=False)
    with RunDirLock(run):  # another open of the directory: flock refuses it as it would another process
        with pytest.raises(RunInUse, match=rf"in use by another trainer \(pid {os.getpid()}, started "):
            train(make_config(max_steps=3), run, resume=True, progress=False)
        with pytest.raises(RunInUse, match="in use"):
            train(make_config(max_steps=2), run, overwrite=True, progress=False)
        assert (run / "summary.txt").is_file() and list_checkpoints(run)
    train(make_config(max_steps=3), run, resume=True, progress=False)  # free again once released


def test_crash_leftovers_are_removed_and_only_step_dirs_count(make_config, tmp_path):
    run = tmp_path / "run"
    cfg = make_config()
    train(cfg, run, progress=False, stop_at_step=4)
    checkpoints = run / "checkpoints"
    (checkpoints / ".step-0000008.tmp-abc123").mkdir()  # a checkpoint being written when the power went
    (checkpoints / "step-backup").mkdir()  # a user's copy: never taken for the latest checkpoint
    (run / ".metrics.jsonl.tmp-xyz").write_text("half")
    stores = tmp_path / "data" / "stores"
    (stores / ".somestore.tmp-q1w2").mkdir()
    assert [p.name for p in list_checkpoints(run)] == ["step-0000004"]
    train(cfg, run, resume=True, progress=False)
    assert not list(checkpoints.glob(".*.tmp-*")) and not list(run.glob(".*.tmp-*"))
    assert not list(stores.glob(".*.tmp-*"))
    assert (checkpoints / "step-backup").is_dir()


def test_resume_before_the_first_checkpoint_says_so_and_resets_the_log(make_config, tmp_path, caplog):
    run = tmp_path / "run"
    cfg = make_config(checkpoint_every=0)
    Trainer(cfg, run, progress=False).close()  # as if killed in step 1: the directory holds its config
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo')
    with caplog.at_level("INFO", logger="megalodon"):
        train(cfg, run, resume=True, progress=False)
    assert "no checkpoint yet" in caplog.text
    assert len(losses(run)) == 8 and losses(run)[0] != 5.0


def test_the_resume_rewrite_of_metrics_is_atomic(make_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = make_config()
    train(cfg, run, progress=False, stop_at_step=6)
    before = (run / "metrics.jsonl").read_text()

    def killed(source, target, _replace=os.replace):  # the process dies before the new log is put in place
        if str(target).endswith("metrics.jsonl"):
            raise KeyboardInterrupt
        _replace(source, target)
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, resume=True, progress=False)
    assert (run / "metrics.jsonl").read_text() == before


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_named_when_read(make_config, tmp_path):
    run = tmp_path / "run"
    cfg = make_config()
    train(cfg, run, progress=False, stop_at_step=4)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 3.1')  # kill -9 during the append of step 5
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 5"):
        read_metrics(run / "metrics.jsonl")
    train(cfg, run, resume=True, progress=False)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")[0]] == list(range(1, 9))


def test_divergence_stops_with_a_clear_message_and_keeps_the_finite_checkpoint(make_config, tmp_path):
    import torch
    from safetensors.torch import load_file

    run = tmp_path / "run"
    cfg = make_config(lr=1e4, warmup_steps=0, checkpoint_every=1, keep_checkpoints=1, max_steps=30, grad_clip=0.0)
    with pytest.raises(RuntimeError, match=r"training diverged at step \d+: the loss is"):
        train(cfg, run, progress=False)
    (latest,) = list_checkpoints(run)
    assert all(torch.isfinite(t).all() for t in load_file(str(latest / "model.safetensors")).values())
    assert not (run / "model" / "model.safetensors").exists()
    assert all(isinstance(x, float) for x in losses(run))  # strict JSON, every logged loss finite
    with pytest.raises(ValueError, match="lr must be a finite number"):
        make_config(lr=float("inf"))


def test_a_run_dir_that_is_a_file_or_read_only_is_named(make_config, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file; give a directory"):
        train(make_config(), tmp_path / "file", progress=False)
    with pytest.raises(ValueError, match="cannot use .*under-a-file"):
        train(make_config(), tmp_path / "file" / "under-a-file", progress=False)
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(ValueError, match="cannot write in the run directory"):
            train(make_config(), tmp_path / "ro", progress=False)


def test_resume_refuses_training_files_that_changed(make_config, corpus, tmp_path):
    run = tmp_path / "run"
    cfg = make_config()
    train(cfg, run, progress=False, stop_at_step=4)
    for path in corpus.iterdir():
        path.write_text(path.read_text().replace("fox", "cat"))
    with pytest.raises(ValueError, match="training data changed since .*step-0000004"):
        train(cfg, run, resume=True, progress=False)


def test_tensorboard_gets_the_logged_figures_or_the_run_names_the_missing_package(make_config, tmp_path, monkeypatch):
    """--tensorboard true: each finite figure of metrics.jsonl as a scalar at its step, the writer closed at the
    end (a stand-in SummaryWriter: tensorboard is not a dependency). Without the package the run is refused
    before it touches its directory, with the command that installs it."""
    scalars, closed = [], []

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            closed.append(self.log_dir)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    train(make_config(tensorboard=True, max_steps=3, eval_every=2, checkpoint_every=0), tmp_path / "run",
          progress=False)
    records = strict_records(tmp_path / "run" / "metrics.jsonl")
    logged = [(key, value, r["step"]) for r in records for key, value in r.items()
              if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)]
    assert scalars == logged
    assert [s for tag, _, s in scalars if tag == "loss"] == [1, 2, 3] and any(t == "val_loss" for t, _, _ in scalars)
    assert closed == [str(tmp_path / "run" / "tensorboard")]

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an import without the package meets
    with pytest.raises(ValueError, match="pip install tensorboard"):
        train(make_config(tensorboard=True), tmp_path / "without", progress=False)
    assert not (tmp_path / "without").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda step: (step / "manifest.json").unlink(), "has no manifest.json: it is incomplete"),
    (lambda step: (step / "manifest.json").write_text('{"model.safetensors": '), "manifest.json is corrupt"),
    (lambda step: (step / "model.safetensors").unlink(), "is missing model.safetensors"),
], ids=["no-manifest", "torn-manifest", "missing-file"])
def test_a_damaged_latest_checkpoint_is_refused_by_what_is_wrong(make_config, tmp_path, damage, message):
    train(make_config(), tmp_path / "run", progress=False)
    previous, latest = list_checkpoints(tmp_path / "run")[-2:]
    damage(latest)
    with pytest.raises(ValueError, match=f"{message}.*the previous checkpoint is .*{previous.name}"):
        train(make_config(), tmp_path / "run", resume=True, progress=False)


def test_non_finite_weights_are_never_checkpointed(make_config, tmp_path):
    with Trainer(make_config(), tmp_path / "run", progress=False) as trainer:
        with torch.no_grad():
            next(trainer.model.parameters()).view(-1)[0] = float("inf")
        with pytest.raises(ValueError, match="refusing to save a checkpoint at step 3: non-finite weights in"):
            save_checkpoint(tmp_path / "run", 3, trainer.model, trainer.optimizer, {}, [], keep=2)
    assert list_checkpoints(tmp_path / "run") == []


def test_overwrite_leaves_nothing_of_the_old_run_and_a_torn_config_is_named_on_resume(make_config, tmp_path):
    run = tmp_path / "run"
    train(make_config(), run, progress=False)  # 8 steps, checkpoints at 4 and 8
    (run / "notes.txt").write_text("the old run's")
    train(make_config(max_steps=2, checkpoint_every=2), run, overwrite=True, progress=False)
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002"]
    assert len(losses(run)) == 2 and not (run / "notes.txt").exists()
    (run / "train_config.json").write_text('{"preset": ')
    with pytest.raises(ValueError, match=r"train_config\.json is corrupt .*restore it, or start a new run"):
        train(make_config(max_steps=2, checkpoint_every=2), run, resume=True, progress=False)
