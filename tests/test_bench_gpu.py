"""benchmarks/bench_gpu.py runs on rented GPU time, so its every section is smoke-tested here on the CPU at tiny
sizes: an API change that would break it fails in CI, not on the device."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_runs_every_section_on_cpu(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--strict",
         "--modes", "eager", "--deadline", "3600", "--out", str(tmp_path)],  # the default sections
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for heading in ("## Parity", "## Training step", "## Decode", "## Profile", "## transformers generate()"):
        assert heading in out.stdout
    assert "FAIL" not in out.stdout
    assert (tmp_path / "results.json").is_file()


def test_gpu_session_names_sections_that_exist():
    """benchmarks/gpu_session.sh passes bench_gpu.py section lists: a typo there would cost a GPU session."""
    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    lists = re.findall(r"^\s*bench ([\w,-]+)\s*$", script, flags=re.MULTILINE)
    assert len(lists) == 2, lists
    for sections in lists:
        out = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--sections", sections,
             "--deadline", "0"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.count("past --deadline") == len(sections.split(","))
