"""Ctrl-C and SIGTERM as a user sends them: a trainer process signalled mid-step, then `--resume`, equals an
uninterrupted run to the bit. A second signal during the checkpoint does no harm; a second trainer is refused."""

import json
import signal
import subprocess
import sys
import time

import pytest

from megalodon.cli import main
from megalodon.training.checkpoint import list_checkpoints
from training_helpers import losses

# The trainer in a child process. It stops twice on the way, so that the test can signal it at a known point:
# in the middle of step 5 (after the batch is drawn) and in the middle of the checkpoint that follows.
CHILD = r'''
import signal, sys, time
from pathlib import Path

# A background job inherits SIGINT ignored; a user's terminal gives the default disposition.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)

import megalodon.training.checkpoint as checkpoint
from megalodon.cli import main
from megalodon.data import PackedBatcher

work, config, run_dir = map(Path, sys.argv[1:])
steps = []

def pause(name):  # tell the test where we are, then wait until it has sent its signal
    (work / name).touch()
    while not (work / f"{name}.go").exists():
        time.sleep(0.01)

def next_batch(self, _original=PackedBatcher.next_batch):
    batch = _original(self)
    steps.append(1)
    if len(steps) == 5:
        pause("mid-step")
    return batch

def save_pretrained(*args, _original=checkpoint.save_pretrained, **kwargs):
    if len(steps) == 5:
        pause("checkpointing")
    return _original(*args, **kwargs)

PackedBatcher.next_batch = next_batch
checkpoint.save_pretrained = save_pretrained
sys.exit(main(["train", "--config", str(config), "--run-dir", str(run_dir)]))
'''


def _wait_for(path, child, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if child.poll() is not None:
            raise AssertionError(f"the trainer exited with {child.returncode} before {path.name}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"the trainer never reached {path.name}")
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_step_then_resume_equals_an_uninterrupted_run(signum, config_file, tmp_path, capsys):
    config = config_file()
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "straight")]) == 0
    run = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    stdout, stderr = open(tmp_path / "stdout", "w+"), open(tmp_path / "stderr", "w+")
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(config), str(run)], stdout=stdout,
                             stderr=stderr, cwd=tmp_path)
    try:
        _wait_for(tmp_path / "mid-step", child)
        # While it runs, a second trainer on its directory is refused and names it; --overwrite deletes nothing.
        capsys.readouterr()
        assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 2
        assert main(["train", "--config", str(config), "--run-dir", str(run), "--overwrite"]) == 2
        refusals = capsys.readouterr().err
        assert refusals.count(f"pid {child.pid}") == 2 and "in use" in refusals
        assert [p.name for p in list_checkpoints(run)] == ["step-0000004"]

        child.send_signal(signum)
        (tmp_path / "mid-step.go").touch()
        _wait_for(tmp_path / "checkpointing", child)
        child.send_signal(signum)  # a second signal while the checkpoint is written
        (tmp_path / "checkpointing.go").touch()
        assert child.wait(timeout=120) == 128 + signum
    finally:
        child.kill()
    stderr.seek(0)
    err = stderr.read()
    assert "Traceback" not in err and "error" not in err, err
    assert "already stopping" in err
    assert f"megalodon train --resume --run-dir {run}" in err  # a logged warning, not the command's output
    assert [p.name for p in list_checkpoints(run)][-1] == "step-0000005"
    assert len(losses(run)) == 5

    assert main(["train", "--resume", "--run-dir", str(run)]) == 0  # the saved options, nothing else
    assert losses(run) == losses(tmp_path / "straight")
    summaries = [json.loads((d / "summary.json").read_text()) for d in (run, tmp_path / "straight")]
    assert summaries[0]["val_loss"] == summaries[1]["val_loss"]
