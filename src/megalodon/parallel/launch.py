"""`megalodon train --nproc N`: the same run under torchrun on this machine (torch.distributed.run, standalone
rendezvous), so that nobody has to spell the torchrun command. Multi-node runs use torchrun itself
(docs/distributed.md)."""

from __future__ import annotations

import json
import signal
import tempfile
from pathlib import Path


def launch_train(nproc: int, options: dict, run_dir: Path, resume: bool, overwrite: bool, device: str) -> int:
    """Run `python -m megalodon train` with these resolved options on `nproc` local ranks; wait for them.

    The ranks read the options from a temporary config file, so that every rank resolves the same run. A rank
    that fails (an error, or killed) ends them all: torchrun's agent stops the others, and this raises a
    RuntimeError that names the rank and how to resume."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    with tempfile.TemporaryDirectory(prefix="megalodon-launch-") as tmp:
        config = Path(tmp) / "train.json"
        config.write_text(json.dumps(options))
        argv = ["train", "--config", str(config), "--run-dir", str(run_dir), "--device", device]
        argv += ["--resume"] * resume + ["--overwrite"] * overwrite
        torchrun = ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "megalodon", *argv]
        try:
            run(get_args_parser().parse_args(torchrun))
        except ChildFailedError as err:
            rank, failure = err.get_first_failure()
            raise RuntimeError(f"rank {rank} of {nproc} (pid {failure.pid}) {_how(failure.exitcode)}, so every "
                               f"rank was stopped. Continue from the last complete checkpoint with: megalodon "
                               f"train --resume --run-dir {run_dir} --nproc {nproc}") from None
    return 0


def _how(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"failed with exit code {exitcode} (its error is above)"
