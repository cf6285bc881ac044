"""The `megalodon` command explains every error in one line (the traceback only with --debug), and finds an
unwritable output before the work."""

import errno
import importlib
import os

import pytest
import torch
from safetensors import SafetensorError

from megalodon.cli import main
from helpers import save_byte_model

RUNS_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes through read-only permissions


@pytest.fixture
def model_dir(tmp_path):
    return save_byte_model(tmp_path / "model")


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["generate", "eval", "train"])
def test_cuda_on_a_cpu_only_torch_is_named(model_dir, tmp_path, capsys, command):
    argv = {"generate": ["generate", str(model_dir), "--prompt", "x"],
            "eval": ["eval", str(model_dir), "--files", str(model_dir / "config.json"), "--out", str(tmp_path)],
            "train": ["train", "--quick", "--run-dir", str(tmp_path / "run")]}[command]
    assert main([*argv, "--device", "cuda"]) == 2
    one_line_error(capsys, "--device cuda", "--device cpu")
    assert main([*argv, "--device", "gpu0"]) == 2
    one_line_error(capsys, "--device 'gpu0'")


@pytest.mark.parametrize("command", ["generate", "train"])
def test_apple_mps_is_refused_before_any_work(model_dir, tmp_path, capsys, command):
    """MPS has no float64, in which the TimestepNorm keeps its statistics: refused at the start, with the fix,
    rather than deep inside the first call."""
    argv = {"generate": ["generate", str(model_dir), "--prompt", "x"],
            "train": ["train", "--quick", "--run-dir", str(tmp_path / "run")]}[command]
    assert main([*argv, "--device", "mps"]) == 2
    one_line_error(capsys, "--device mps", "float64", "--device cpu")
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(model_dir, monkeypatch):
    argv = ["generate", str(model_dir), "--prompt", "x", "--temperature", "-1"]
    with pytest.raises(ValueError, match="temperature"):
        main([*argv, "--debug"])
    monkeypatch.setenv("MEGALODON_DEBUG", "1")
    with pytest.raises(ValueError, match="temperature"):
        main(argv)


def test_an_unexpected_error_is_one_line_that_says_how_to_see_more(model_dir, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("layers.0")

    monkeypatch.setattr("megalodon.checkpoint.load_pretrained", broken)
    assert main(["generate", str(model_dir), "--prompt", "x"]) == 2
    one_line_error(capsys, "KeyError", "--debug")


def _never(*args, **kwargs):
    raise AssertionError("the work ran although the output location was unusable")


def forbid_work(monkeypatch):
    """Make evaluation and generation fail the test if they run."""
    evaluate = importlib.import_module("megalodon.inference.evaluate")
    generate = importlib.import_module("megalodon.inference.generate")
    for module, name in ((evaluate, "evaluate"), (generate, "generate"), (generate, "prefill_session")):
        monkeypatch.setattr(module, name, _never)


def test_eval_out_that_is_a_file_is_refused_before_the_work(model_dir, tmp_path, capsys, monkeypatch):
    forbid_work(monkeypatch)
    (tmp_path / "doc.txt").write_text("some words to evaluate")
    out = tmp_path / "report.json"
    out.write_text("{}")
    assert main(["eval", str(model_dir), "--files", str(tmp_path / "doc.txt"), "--out", str(out)]) == 2
    one_line_error(capsys, "--out", str(out), "not a directory")


def full_disk(monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("megalodon.files.os.fsync", no_space)


def test_a_full_disk_is_found_before_eval_and_generate_work(model_dir, tmp_path, capsys, monkeypatch):
    full_disk(monkeypatch)
    forbid_work(monkeypatch)
    (tmp_path / "doc.txt").write_text("some words to evaluate")
    assert main(["eval", str(model_dir), "--files", str(tmp_path / "doc.txt"), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "--out", "No space left")
    for extra in ([], ["--prefill-only"]):
        assert main(["generate", str(model_dir), "--prompt", "x", "--session-out", str(tmp_path / "s"),
                     *extra]) == 2
        one_line_error(capsys, "--session-out", "No space left")


@pytest.mark.skipif(RUNS_AS_ROOT, reason="root writes into read-only directories")
def test_a_read_only_location_is_found_before_the_work(model_dir, tmp_path, capsys, monkeypatch):
    forbid_work(monkeypatch)
    (tmp_path / "doc.txt").write_text("some words to evaluate")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["eval", str(model_dir), "--files", str(tmp_path / "doc.txt"), "--out", str(locked)]) == 2
        one_line_error(capsys, "--out", "ermission denied")
        assert main(["generate", str(model_dir), "--prompt", "x", "--session-out", str(locked / "s")]) == 2
        one_line_error(capsys, "--session-out", "ermission denied")
    finally:
        locked.chmod(0o755)


def test_a_failing_write_is_one_line_and_keeps_the_old_session(model_dir, tmp_path, capsys, monkeypatch):
    session = tmp_path / "s"
    assert main(["generate", str(model_dir), "--prompt", "x", "--max-new-tokens", "1", "--session-out",
                 str(session)]) == 0
    before = session.read_bytes()

    def no_space(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr("megalodon.state.save_file", no_space)
    assert main(["generate", str(model_dir), "--session-in", str(session), "--max-new-tokens", "1",
                 "--session-out", str(session)]) == 2
    one_line_error(capsys, "safetensors", "disk full")
    assert session.read_bytes() == before


def test_a_prompt_file_that_is_not_utf8_is_named(model_dir, tmp_path, capsys):
    prompt = tmp_path / "latin1.txt"
    prompt.write_bytes("caf\xe9".encode("latin-1"))
    assert main(["generate", str(model_dir), "--prompt-file", str(prompt)]) == 2
    one_line_error(capsys, str(prompt), "UTF-8")
    assert main(["generate", str(model_dir), "--prompt-file", str(tmp_path)]) == 2
    one_line_error(capsys, str(tmp_path))


def test_threads_are_named(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "x", "--threads", "-2"]) == 2
    one_line_error(capsys, "--threads")


class Executes:
    def __reduce__(self):
        return (print, ("this ran",))


def test_garbage_reference_files_never_suggest_unsafe_loading(tmp_path, model_dir, capsys):
    config = str(model_dir / "config.json")
    torch.save({"x": Executes()}, tmp_path / "code.pth")
    for name, data in (("garbage.pth", os.urandom(300)), ("text.pth", b"hello"),
                       ("garbage.safetensors", os.urandom(300)), ("code.pth", None)):
        if data is not None:
            (tmp_path / name).write_bytes(data)
        assert main(["convert", "from-reference", str(tmp_path / name), str(tmp_path / "out"), "--config",
                     config]) == 2
        line = one_line_error(capsys, str(tmp_path / name))
        for unsafe_advice in ("weights_only=False", "weights_only` set to `False", "safe_globals"):
            assert unsafe_advice not in line


def test_ctrl_c_during_eval_is_one_line_and_writes_nothing(model_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("megalodon.inference.evaluate"), "evaluate", interrupted)
    (tmp_path / "doc.txt").write_text("some words to evaluate")
    out = tmp_path / "report"
    assert main(["eval", str(model_dir), "--files", str(tmp_path / "doc.txt"), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "megalodon eval: interrupted" in err and "Traceback" not in err
    assert not (out / "eval.json").exists()


def test_without_posix_file_locks_only_training_is_refused(tmp_path):
    """Where Python has no fcntl (Windows), every command still starts; training, which locks its run directory
    with flock, refuses in one line that names the platforms it needs. fcntl is hidden from a fresh interpreter."""
    import subprocess
    import sys

    script = ("import sys; sys.modules['fcntl'] = None\n"  # `import fcntl` now fails, as on Windows
              "from megalodon.cli import main\n"
              "assert main(['generate', '--help']) == 0\n"
              f"sys.exit(main(['train', '--quick', '--run-dir', {str(tmp_path / 'run')!r}]))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "megalodon train: error: training locks its run directory" in out.stderr and "WSL" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()
