"""`megalodon train --nproc 2` under torchrun (a real launch: 2 worker processes under torchrun's agent): a rank
killed mid-run ends the whole run at once with a message naming it and the resume command, and `--resume` goes on
from the last complete checkpoint (here in one process: the sharded checkpoint loads at any number of ranks)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megalodon.training.checkpoint import list_checkpoints, verify_checkpoint
from megalodon.training.config import TrainConfig
from megalodon.training.trainer import train
from training_helpers import run_values, strict_records

START_TIMEOUT_S = 120  # two fresh interpreters importing torch on a loaded 2-core machine
FAIL_FAST_S = 20  # the agent sees the dead worker within a second and stops the other


def workers_of(pid: int) -> dict[int, int]:
    """rank -> pid of the processes whose parent is `pid` and whose environment names a RANK."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid and "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


@pytest.mark.slow
def test_a_killed_rank_fails_fast_and_the_run_resumes(corpus, tmp_path):
    values = run_values(corpus, tmp_path, max_steps=100_000, warmup_steps=2, checkpoint_every=2, grad_accum=1,
                        nproc=2, parallel="fsdp")
    config = tmp_path / "run.json"
    config.write_text(json.dumps(values))
    run = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "megalodon", "train", "--config", str(config), "--run-dir",
                                 str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(list_checkpoints(run)) < 2:  # training is under way, with checkpoints written
            assert launcher.poll() is None, launcher.communicate()
            assert time.monotonic() < deadline, "no checkpoint within the start timeout"
            time.sleep(0.2)
        workers = workers_of(launcher.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = launcher.communicate(timeout=FAIL_FAST_S)
        took = time.monotonic() - killed
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 2, stderr
    assert f"rank 1 of 2 (pid {workers[1]}) was killed by SIGKILL" in stderr, stderr
    assert f"megalodon train --resume --run-dir {run} --nproc 2" in stderr, stderr
    assert took < FAIL_FAST_S
    assert not workers_of(launcher.pid) and all(not Path(f"/proc/{pid}").exists() or
                                                 "zombie" in Path(f"/proc/{pid}/status").read_text()
                                                 for pid in workers.values())

    latest = list_checkpoints(run)[-1]  # complete: the kill may have cut a later one short, which is not listed
    verify_checkpoint(latest)
    step = int(latest.name.split("-")[1])
    result = train(TrainConfig(**{**values, "nproc": 0, "max_steps": step + 2}), run, resume=True, progress=False)
    assert result.finished and result.steps == step + 2
    steps = [r["step"] for r in strict_records(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, step + 3)), steps  # the steps after the checkpoint were dropped and redone
