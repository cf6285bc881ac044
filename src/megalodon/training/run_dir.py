"""The run directory: one trainer at a time, files replaced atomically, leftovers of crashes removed.

Locking is an exclusive `flock` on the run directory itself. The kernel drops it when the process ends however
it ends (kill -9 included), so a crashed run never leaves a stale lock behind; the hidden `.lock` file only
tells a refused trainer who holds the directory. flock is POSIX: where there is no `fcntl` (Windows), this module
still imports, so that every command but training runs, and training refuses to start (`require_file_locks`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

OWNER = ".lock"
TEMP_MARK = ".tmp-"  # in the name of every temporary file or directory: `.<final name>.tmp-<random>`
# Options that change how a run is watched or executed, not what it computes: they may differ on resume.
# max_steps and time_budget_min change the run's length (see Trainer._resume for what that does).
RESUMABLE_CHANGES = frozenset({
    "max_steps", "time_budget_min", "data_dir", "threads", "compile", "activation_checkpointing", "cuda_graphs",
    "log_every", "eval_every", "eval_batch_size", "sample_every", "sample_prompt", "sample_tokens", "checkpoint_every",
    "keep_checkpoints", "tensorboard", "nproc", "parallel", "chunk_parallel", "collective_timeout_min",
})


def require_file_locks() -> None:
    if fcntl is None:
        raise RuntimeError("training locks its run directory and token stores with POSIX file locks (fcntl), which "
                           "this platform lacks: train on Linux or macOS (on Windows, inside WSL); generation, "
                           "evaluation and the Hugging Face adapter do not need them")


class RunInUse(RuntimeError):
    """Another trainer holds the run directory."""


class RunDirLock:
    """An exclusive lock on a run directory (created if missing), held from acquire() to release()."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        require_file_locks()
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"--run-dir {self.run_dir} is a file; give a directory (new or holding a run)")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise ValueError(f"cannot use {self.run_dir} as the run directory: {err.strerror}; give another "
                             "--run-dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunInUse(f"{self.run_dir} is in use by another trainer ({self._holder()}); wait for it to end, "
                           "or stop it first (Ctrl-C or kill -TERM saves its checkpoint)") from None
        self._fd = fd
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            (self.run_dir / OWNER).write_text(json.dumps({"pid": os.getpid(), "started": started,
                                                          "host": socket.gethostname()}))
        except OSError as err:
            self.release()
            raise ValueError(f"cannot write in the run directory {self.run_dir}: {err.strerror}; give a writable "
                             "--run-dir") from None
        return self

    def _holder(self) -> str:
        try:
            owner = json.loads((self.run_dir / OWNER).read_text())
            return f"pid {owner['pid']}, started {owner['started']} on host {owner['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "it is starting, or it predates .lock files"

    def release(self) -> None:
        if self._fd is not None:
            (self.run_dir / OWNER).unlink(missing_ok=True)
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def prepare_run_dir(run_dir: Path, options: dict, resume: bool, overwrite: bool) -> None:
    """Check what a locked run directory holds against what was asked, empty it for --overwrite, and remove
    the temporary files of writes a crash interrupted (no one else writes here: we hold the lock)."""
    entries = [p for p in run_dir.iterdir() if p.name != OWNER]
    if entries and overwrite:
        for path in entries:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    elif entries and not resume:
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
    elif entries:
        check_same_run(run_dir, options)
    for parent in (run_dir, run_dir / "checkpoints"):
        for path in parent.glob(f".*{TEMP_MARK}*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def saved_options(run_dir: Path) -> dict:
    """The options a run directory was trained with (its train_config.json)."""
    path = Path(run_dir) / "train_config.json"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a training run directory (no train_config.json)")
    try:
        options = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is corrupt ({err}); restore it, or start a new run") from None
    if not isinstance(options, dict):
        raise ValueError(f"{path} is corrupt: it holds a {type(options).__name__}, not the run's options")
    return options


def check_same_run(run_dir: Path, options: dict) -> None:
    """Refuse to resume with options that would change what the run computes."""
    saved = saved_options(run_dir)
    diffs = [k for k in options if k not in RESUMABLE_CHANGES and saved.get(k) != options[k]]
    if diffs:
        changes = ", ".join(f"{k} (saved {saved.get(k)!r}, given {options[k]!r})" for k in sorted(diffs))
        raise ValueError(f"{run_dir} holds a different run: {changes}. These cannot change on resume; use "
                         "another --run-dir, or --overwrite to replace the run")


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader, or a crash, sees the old file or the new one, never a part:
    write a temporary file beside it, sync it, rename it over the old one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def exclusive(lock_file: Path, wait: bool = True):
    """Hold an exclusive flock on `lock_file` (created if missing). With wait=False, yield False at once when
    another process holds it, True when we got it."""
    require_file_locks()
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:  # "a": create without truncating
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def remove_stale_temporaries(directory: Path) -> None:
    """Remove `.<name>.tmp-*` entries whose builder is gone: it held `.<name>.lock` while it wrote them."""
    for path in directory.glob(f".*{TEMP_MARK}*"):
        name = re.fullmatch(rf"\.(.+){re.escape(TEMP_MARK)}.*", path.name).group(1)
        with exclusive(directory / f".{name}.lock", wait=False) as free:
            if free:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
