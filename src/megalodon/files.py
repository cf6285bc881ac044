"""Where the commands write: never over what they should not replace, found unwritable before the work starts,
replaced whole or not at all, and checksummed so that damage is found when they are read back."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

PROBE_BYTES = 64 * 1024  # a full disk refuses this much; an empty file can still be created on one


def check_writable_dir(directory: str | Path, what: str) -> Path:
    """Create `directory` if needed and write and remove a small file in it, so that a read-only, full or
    missing location is reported now, naming `what` (e.g. "--out"), rather than after the work."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{what}: {directory} is a file, not a directory; choose a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-probe-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(b"\0" * PROBE_BYTES)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            os.unlink(probe)
    except OSError as err:
        reason = err.strerror or str(err)
        raise OSError(err.errno, f"{what}: cannot write in {directory} ({reason}); free some space, fix the "
                                 "permissions, or choose another location") from None
    return directory


def is_model_directory(directory: Path) -> bool:
    return (directory / "config.json").is_file()


def check_output_path(path: str | Path, overwrite: bool, what: str, is_file: bool = False) -> Path:
    """Refuse an existing output unless overwrite; with overwrite, a directory is replaced only if it holds a
    model (never a directory of other things). An unwritable location is refused now, before the work.
    is_file: the output is one file (else a directory)."""
    path = Path(path)
    check_writable_dir(path.parent, f"{what} {path}")
    if is_file and path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory; give the path of a file to write")
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return path
    if not overwrite:
        raise FileExistsError(f"{what} {path} already exists; pass --overwrite to replace it, or choose another "
                              "path")
    if path.is_dir() and not is_model_directory(path):
        raise FileExistsError(f"{what} {path} is not a model directory (no config.json) and is not empty: "
                              "--overwrite replaces model directories only; choose a new or empty directory")
    return path


def replace_directory(target: str | Path, build: Callable[[Path], None]) -> Path:
    """Build a directory under a temporary name beside `target`, then put it in target's place, so that nothing
    of an old directory (say, another model's tokenizer) survives beside the new files, and a failed build
    leaves the old directory as it was."""
    target = Path(target)
    parent = target.parent
    check_writable_dir(parent, str(target))
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.tmp-"))
    try:
        build(tmp)
        if target.is_dir():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def replace_file(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a file under a temporary name beside `target`, sync it, then rename it over target: a crash leaves
    the old file or the new one."""
    target = Path(target)
    check_writable_dir(target.parent, str(target))
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
