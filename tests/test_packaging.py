"""The package as a user gets it: its metadata, the built-in configs, the entry points, the lowest declared Python,
and a wheel built from the sdist, installed into a fresh virtualenv and run from outside the repository."""

from __future__ import annotations

import email
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import megalodon
from megalodon import configs
from megalodon.training.config import TrainConfig, read_config_file

import tomllib

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
FLOOR = re.fullmatch(r">=\s*(3\.\d+)", PROJECT["requires-python"]).group(1)
TINY_TRAIN = ["--max_steps", "2", "--tokenizer", "byte", "--preset", "tiny", "--seq_len", "32", "--batch_size", "2",
              "--dtype", "fp32", "--sample_tokens", "8", "--threads", "1"]


def _requirements(extra: str | None = None) -> list[str]:
    reqs = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return [re.split(r"[\s<>=!;\[]", r, maxsplit=1)[0] for r in reqs]


def test_metadata_declares_the_license_extras_and_links():
    assert PROJECT["license"] == "MIT" and PROJECT["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])  # the SPDX field replaces them
    assert f"Programming Language :: Python :: {FLOOR}" in PROJECT["classifiers"]
    assert PROJECT["urls"] and PROJECT["dynamic"] == ["version"]
    assert "matplotlib" not in _requirements() and _requirements("plot") == ["matplotlib"]
    assert not any(r.startswith("tomli") for r in PROJECT["dependencies"])  # tomllib is in the floor's stdlib
    assert _requirements("hf") == ["transformers"]  # lm-eval and its dependencies only come with `eval`
    assert "lm-eval" in _requirements("eval") and "triton" in _requirements("dev")


def test_an_older_torch_is_refused_at_import_with_the_fix():
    """The import refuses what pip's resolver would (installs with --no-deps, a checkout on PYTHONPATH), with the
    floor pyproject.toml declares."""
    declared = next(r for r in PROJECT["dependencies"] if r.startswith("torch"))
    assert re.match(r"torch>=(\d+)\.(\d+)", declared).groups() == tuple(map(str, megalodon.TORCH_FLOOR))
    for version in ("2.9.1+cu128", "2.4.1", "1.13.0", "nightly"):
        with pytest.raises(ImportError, match=rf"needs torch>=2\.10, and this is torch {re.escape(version)}.*"
                                              rf"pip install 'torch>=2\.10'"):
            megalodon.check_torch(version)
    for version in ("2.10.0", "2.10.0.dev20251201+cu128", "2.13.0+cpu", "3.0.0"):
        megalodon.check_torch(version)


def test_built_in_configs_are_found_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo = read_config_file("demo")
    assert demo == tomllib.loads((configs.DIRECTORY / "demo.toml").read_text())
    assert TrainConfig.from_dict(demo).preset == "small"
    with pytest.raises(FileNotFoundError, match="use --config demo"):
        read_config_file("configs/demo.toml")  # where the demo config used to live
    with pytest.raises(FileNotFoundError, match=r"no built-in config of that name \(built-in: demo\)"):
        read_config_file("dmeo")
    (tmp_path / "mine.toml").write_text('preset = "tiny"\n[model]\nchunk_size = 16\n')
    assert read_config_file("mine.toml") == {"preset": "tiny", "model": {"chunk_size": 16}}


def test_python_dash_m_and_version():
    run = subprocess.run([sys.executable, "-m", "megalodon", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"megalodon-torch {megalodon.__version__}"


def test_without_matplotlib_a_plot_is_skipped_with_the_install_step(tmp_path, monkeypatch, caplog):
    from megalodon.training.report import plot_curves

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    plot_curves({"megalodon": ([{"step": 1, "tokens": 64, "loss": 5.0}], [])}, tmp_path / "loss.png", "title")
    assert not (tmp_path / "loss.png").exists()
    assert f"skipped {tmp_path / 'loss.png'}: plots need matplotlib (pip install 'megalodon-torch[plot]')" \
        in caplog.text


# ---- the lowest declared Python -------------------------------------------------------------------------------------
def _python(version: str) -> str | None:
    """An interpreter of exactly `version` on this machine (PATH, pyenv, /usr/bin), or None."""
    candidates = [shutil.which(f"python{version}"), f"/usr/bin/python{version}",
                  *sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))]
    for candidate in (c for c in candidates if c and os.path.isfile(c)):
        probe = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
    return None


FLOOR_CHECK = """
import sys, types
from pathlib import Path
src = Path(sys.argv[1])
for path in sorted(src.rglob("*.py")):  # every module parses on this Python
    compile(path.read_text(encoding="utf-8"), str(path), "exec")
# The config modules need no torch: import them without the package's __init__ (which imports the model).
package = types.ModuleType("megalodon")
package.__path__ = [str(src / "megalodon")]
sys.modules["megalodon"] = package
from megalodon.training.config import TrainConfig, read_config_file
config = TrainConfig.from_dict(read_config_file("demo"))
own = Path(sys.argv[2])
own.write_text('preset = "tiny"\\nlr = 3e-3\\n[model]\\nchunk_size = 16\\n')
assert read_config_file(own) == {"preset": "tiny", "lr": 3e-3, "model": {"chunk_size": 16}}
print("ok", config.preset, sys.version_info[:2])
"""


@pytest.mark.slow
def test_config_files_and_syntax_on_the_lowest_declared_python(tmp_path):
    python = _python(FLOOR)
    if python is None:
        pytest.skip(f"no Python {FLOOR} on this machine (the declared floor); the config tests ran on "
                    f"{sys.version_info.major}.{sys.version_info.minor} only")
    # -I: the floor's bare standard library, none of this environment's packages
    run = subprocess.run([python, "-I", "-c", FLOOR_CHECK, str(REPO / "src"), str(tmp_path / "mine.toml")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok small")


# ---- sdist -> wheel -> a fresh virtualenv -----------------------------------------------------------------------
def _source_tree(destination: Path) -> Path:
    """The files of a clone with this working tree's changes (tracked and untracked, not ignored)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """An sdist of the working tree, and the wheel built from that sdist (so the sdist must be complete)."""
    if not (REPO / ".git").exists():
        pytest.skip("builds the sdist from a git checkout (this tree is an unpacked sdist)")
    work = tmp_path_factory.mktemp("packaging")
    tree = _source_tree(work / "tree")
    build_sdist = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    run = subprocess.run([sys.executable, "-c", build_sdist, str(work / "dist")], cwd=tree, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    sdist = work / "dist" / run.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        archive.extractall(work / "unpacked", filter="data")
    [unpacked] = (work / "unpacked").iterdir()
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(work / "dist"), str(unpacked)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    [wheel] = (work / "dist").glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


@pytest.mark.slow
def test_the_sdist_holds_the_tests_configs_and_license(built):
    with tarfile.open(built["sdist"]) as archive:
        names = {"/".join(name.split("/")[1:]) for name in archive.getnames()}
    tracked = subprocess.run(["git", "ls-files", "tests"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    missing = [name for name in tracked if (REPO / name).is_file() and name not in names]
    assert not missing, f"the sdist lacks {missing}"
    assert {"tests/conftest.py", "tests/helpers.py", "src/megalodon/configs/demo.toml", "LICENSE",
            "pyproject.toml", "README.md", "Makefile"} <= names


@pytest.mark.slow
def test_the_wheel_holds_the_configs_and_the_metadata(built):
    with zipfile.ZipFile(built["wheel"]) as archive:
        names = set(archive.namelist())
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(archive.read(metadata_name))
    assert {"megalodon/configs/demo.toml", "megalodon/training/__init__.py", "megalodon/__main__.py",
            "megalodon/hf/no_triton.py"} <= names
    assert not any(name.startswith("tests/") for name in names)
    assert metadata["Version"] == megalodon.__version__ and metadata["License-Expression"] == "MIT"
    assert metadata["Requires-Python"] == PROJECT["requires-python"]
    assert {"hf", "eval", "plot", "corpora", "dev"} <= set(metadata.get_all("Provides-Extra"))
    assert metadata.get_all("Project-URL")


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_virtualenv_and_trains(built, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # torch from this machine's local CPU wheel (see shared platform notes); no bytecode compile, to save time.
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-compile", "torch==2.13.0",
                              str(built["wheel"])], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"  # outside the repository: only the installed package can answer
    elsewhere.mkdir()
    (elsewhere / "tiny.txt").write_text("".join(f"line {i}: the king and the queen of denmark\n" for i in range(80)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"

    def megalodon_command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "megalodon"), *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=300)

    version = megalodon_command("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"megalodon-torch {megalodon.__version__}"
    where = subprocess.run([str(python), "-c", "import megalodon; print(megalodon.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=120)
    assert str(venv) in where.stdout, where.stdout + where.stderr
    train = megalodon_command("train", "--config", "demo", "--data", "tiny.txt", "--run-dir", "run", *TINY_TRAIN)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "validation bits/byte" in train.stdout
    assert (elsewhere / "run" / "model" / "model.safetensors").is_file()
    # The wheel's default install has no matplotlib: the run's loss plot is skipped, and the message says why.
    assert "plots need matplotlib (pip install 'megalodon-torch[plot]')" in train.stderr
