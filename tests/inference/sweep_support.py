"""The machinery of the bad-input sweep (test_bad_input_sweep.py): a workspace of tiny models, sessions and
files, the faults it injects, and the classification of each outcome."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import torch

from helpers import edit_safetensors
from megalodon.checkpoint import load_pretrained, save_pretrained
from megalodon.cli import main
from megalodon.data import ByteTokenizer, build_token_store

CLEAR_API_ERRORS = (ValueError, TypeError, OSError)


def _inference_conftest():
    """This directory's conftest (its tiny models), by path: `import conftest` may find another directory's."""
    spec = importlib.util.spec_from_file_location("inference_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_conftest = _inference_conftest()
make_model, make_llama = _conftest.make_model, _conftest.make_llama


class Workspace:
    """A tiny model directory, a baseline, a session and some files; fresh copies for cases that damage them."""

    def __init__(self, root: Path):
        self.root = root
        self.model = root / "model"
        save_pretrained(make_model(dtype=torch.float32), self.model)
        ByteTokenizer().save(self.model)
        self.other = root / "other"
        save_pretrained(make_model(seed=7, dtype=torch.float32), self.other)
        ByteTokenizer().save(self.other)
        self.llama = root / "llama"
        save_pretrained(make_llama(torch.float32), self.llama)
        ByteTokenizer().save(self.llama)
        self.session = root / "good.session"
        assert main(["generate", str(self.model), "--prompt", "hi", "--max-new-tokens", "2",
                     "--session-out", str(self.session)]) == 0
        self.text = self.file("doc.txt", "Some words to evaluate, long enough for a few chunks.")
        self.reference = root / "ref.pth"
        assert main(["convert", "to-reference", str(self.model), str(self.reference)]) == 0
        self._copies = 0

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def copy(self, source: Path | None = None) -> Path:
        self._copies += 1
        target = self.root / f"copy{self._copies}"
        if (source or self.model).is_dir():
            shutil.copytree(source or self.model, target)
        else:
            shutil.copy(source, target)
        return target

    def damaged_model(self, change: Callable[[Path], None]) -> Path:
        directory = self.copy()
        change(directory)
        return directory

    def damaged_session(self):
        path = self.copy(self.session)
        flip_last_byte(path)
        return path

    def truncated_session(self):
        path = self.copy(self.session)
        path.write_bytes(path.read_bytes()[:-50])
        return path

    def byte_store(self, corrupt=False):
        store = build_token_store([f"document number {i}, with words." for i in range(40)], ByteTokenizer(),
                                  self.root / f"store{self._copies}", overwrite=True)
        self._copies += 1
        if corrupt:
            (store / "meta.json").write_text("{")
        return store

    def bpe_store(self):
        from megalodon.data.tokenizer import BPETokenizer

        texts = [f"document number {i}, with words." for i in range(40)]
        return build_token_store(texts, BPETokenizer.train(texts, vocab_size=270), self.root / "bpe-store",
                                 overwrite=True)

    def saved_pth(self, obj):
        self._copies += 1
        path = self.root / f"obj{self._copies}.pth"
        torch.save(obj, path)
        return path

    def code_pth(self):
        return self.saved_pth({"x": RunsCode()})

    def reference_without(self, key):
        tensors = torch.load(self.reference, weights_only=True)
        tensors.pop(key)
        return self.saved_pth(tensors)

    def reference_with_nan(self):
        tensors = torch.load(self.reference, weights_only=True)
        tensors["layers.0.mega.wz.weight"] = torch.full_like(tensors["layers.0.mega.wz.weight"], float("nan"))
        return self.saved_pth(tensors)

    def bare_state(self):
        model = load_pretrained(self.model)
        with torch.no_grad():
            _, state = model(torch.zeros(1, 3, dtype=torch.int64), return_state=True)
        path = self.root / "bare.state"
        state.save(path, model.config)
        return path


class RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def edit_config(**changes):
    def change(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        config.update(changes)
        (directory / "config.json").write_text(json.dumps(config))
        # a hand edit of an old directory: only validation can catch it
        (directory / "checksums.json").unlink(missing_ok=True)
    return change


def nan_weights(directory: Path) -> None:
    edit_safetensors(directory / "model.safetensors", lambda tensors: tensors[sorted(tensors)[0]].fill_(float("nan")))
    (directory / "checksums.json").unlink(missing_ok=True)


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def read_only(*args, **kwargs):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), args[0] if args else None)


@dataclass
class Case:
    name: str
    build: Callable[[Workspace], list[str] | Callable[[], object]]  # CLI argv, or an API call
    needle: str  # what the message must contain
    patches: dict = field(default_factory=dict)  # target -> replacement, for simulated faults

    @property
    def kind(self) -> str:
        return self.name.split(":")[0]


def run_case(case: Case, ws: Workspace) -> tuple[str, str]:
    """(outcome, message): outcome is "clear", "unclear" (an error without the expected words, or not one line),
    "traceback" (an exception escaped, or a raw library error from the API) or "accepted"."""
    with contextlib.ExitStack() as stack:
        built = case.build(ws)
        for target, replacement in case.patches.items():
            stack.enter_context(mock.patch(target, replacement))
        if callable(built):
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")  # the note on directories without checksums, say
            try:
                built()
            except CLEAR_API_ERRORS as err:
                return ("clear" if case.needle in str(err) else "unclear"), f"{type(err).__name__}: {err}"
            except Exception as err:  # noqa: BLE001 - a raw error is what the sweep looks for
                return "traceback", f"{type(err).__name__}: {err}"
            return "accepted", ""
        err, out = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = main(built)
        except SystemExit as exit_:  # argparse: usage and one error line, exit 2
            code = exit_.code
        except BaseException as exc:  # noqa: BLE001
            return "traceback", f"{type(exc).__name__}: {exc}"
    text = err.getvalue()
    if code == 0:
        return "accepted", text
    lines = [line for line in text.splitlines() if "error:" in line]
    if "Traceback" in text:
        return "traceback", text
    clear = code == 2 and len(lines) == 1 and case.needle in lines[0]
    return ("clear" if clear else "unclear"), (lines[0] if lines else text)
