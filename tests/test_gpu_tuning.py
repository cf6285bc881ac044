"""benchmarks/gpu_tuning.py picks the Triton kernels' settings on rented GPU time (gpu_session.sh tuned): its
choices, its order and its timing are tested here on the CPU, with its smoke mode and bench_gpu.py taking its file."""

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_tuning_keeps_the_default_unless_a_candidate_beats_it_clearly():
    """gpu_tuning.py's choice: the fastest candidate only where it beats the default by more than the margin, so
    that noise does not move a setting; a default that failed (infinite time) is kept, not compared."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_tuning import MARGIN, choose

    assert choose({"64": 1.0, "32": 0.8}, "64") == "32"
    assert choose({"64": 1.0, "32": 1.0 - MARGIN / 2}, "64") == "64"
    assert choose({"64": 1.0, "32": 1.2}, "64") == "64"
    assert choose({"64": float("inf"), "32": 0.5}, "64") == "64"
    assert choose({"triton": 1.0, "torch": 0.5}, "triton") == "torch"


def test_tuning_groups_start_from_the_modules_own_settings():
    """Each group's first candidate is what its module sets now (the default a candidate must beat): a default
    changed in the module without its group fails here, not on the GPU."""
    pytest.importorskip("triton")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_tuning

    for _, module, _, candidates in gpu_tuning.groups():
        gpu_tuning.defaults_match(module, candidates)


def test_tuning_spends_its_time_where_it_decides_most(monkeypatch):
    """gpu_tuning.tune's order: the CEMA's and the norm's kernels against their PyTorch paths first; no tilings
    tuned for a kernel turned off; the other kernels compared under the tilings chosen (the attention's softmax
    under the query blocks picked); a comparison that fails costs only itself; the settings written after each
    group; the modules' own settings restored at the end."""
    pytest.importorskip("triton")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_tuning

    from megalodon import MegalodonConfig
    from megalodon.ops import attention
    from megalodon.ops.triton import DISABLE_ENV

    monkeypatch.delenv(DISABLE_ENV, raising=False)
    seen = []

    def fake_compare(candidates, device):
        if set(candidates) != {"triton", "torch"}:  # a group of tilings: its last candidate wins
            seen.append(("group", next(iter(candidates))))
            return {label: 1.0 - 0.1 * i for i, label in enumerate(candidates)}, "fake"
        with candidates["torch"][0]():
            kernel = os.environ[DISABLE_ENV]
        seen.append((kernel, attention.QUERY_BLOCKS_MAX))
        if kernel == "timestep_norm":
            raise RuntimeError("capture failed")
        return {"triton": 2.0 if kernel == "cema" else 1.0, "torch": 1.0}, "fake"

    monkeypatch.setattr(gpu_tuning, "compare", fake_compare)
    writes = []
    blocks = attention.QUERY_BLOCKS_MAX
    settings = gpu_tuning.tune(gpu_tuning.Shape(MegalodonConfig.from_preset("tiny"), 64, "cpu"), float("inf"),
                               lambda settings: writes.append(json.loads(json.dumps(settings))))
    assert seen == [("cema", blocks), ("timestep_norm", blocks), ("group", "4"), ("group", "1"),
                    ("group", "256x8, 4, 32"),
                    ("silu_gate", 1), ("norm_rows", 1), ("causal_softmax", 1), ("queries_keys", 1),
                    ("add_linear", 1)]
    assert settings["disable"] == ["cema"] and "timestep_norm kernels (their ops)" not in settings["timings"]
    assert settings["modules"][gpu_tuning.ATTENTION] == {"QUERY_BLOCKS_MAX": 1}
    assert len(writes) >= 7 and writes[0]["disable"] == [] and writes[-1] == json.loads(json.dumps(settings))
    assert attention.QUERY_BLOCKS_MAX == blocks


def test_tuning_compares_candidates_in_turn_and_a_failing_one_loses(monkeypatch):
    """gpu_tuning.compare on the CPU: each candidate's runs under its own settings, ROUNDS samples each in a
    rotating order, the median kept; a candidate whose run fails gets an infinite time, the others their own."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_tuning

    calls = []

    def candidate(label, fails=False):
        @contextlib.contextmanager
        def settings():
            calls.append(label)
            yield

        def run():
            if fails:
                raise ValueError("no such tiling")
        return settings, [run]

    monkeypatch.setattr(gpu_tuning, "op_time", lambda run, device: run() or 1.0)
    times, method = gpu_tuning.compare({"a": candidate("a"), "b": candidate("b"), "c": candidate("c", True)}, "cpu")
    assert times == {"a": 1.0, "b": 1.0, "c": float("inf")} and method == "wall clock"
    # the warm-ups, then the samples: a b, b a, a b, ...
    assert calls[:3] == ["a", "b", "c"] and calls[3:] == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]


def test_kernel_settings_are_applied_and_recorded_or_refused(tmp_path, monkeypatch):
    """apply_settings sets each module's attribute and adds the ops to turn off to MEGALODON_DISABLE_TRITON;
    bench_gpu.py --kernel-settings records them in its results and its env section shows the ops off; a setting
    no module has is refused."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_tuning import apply_settings

    from megalodon.ops import attention
    from megalodon.ops.triton import DISABLE_ENV, disabled_ops

    settings = {"modules": {"megalodon.ops.attention": {"QUERY_BLOCKS_MAX": 8}}, "disable": ["silu_gate"]}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    monkeypatch.setattr(attention, "QUERY_BLOCKS_MAX", attention.QUERY_BLOCKS_MAX)  # restored after the test
    monkeypatch.setenv(DISABLE_ENV, "cema")
    assert apply_settings(tmp_path / "settings.json") == settings
    assert attention.QUERY_BLOCKS_MAX == 8 and disabled_ops() == {"cema", "silu_gate"}

    monkeypatch.delenv(DISABLE_ENV)
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--strict", "--sections",
         "env", "--out", str(tmp_path), "--kernel-settings", str(tmp_path / "settings.json")],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["kernel_settings"] == settings and results["env"]["triton_disabled"] == ["silu_gate"]

    (tmp_path / "typo.json").write_text(json.dumps({"modules": {"megalodon.ops.attention": {"QUERY_BLOCK_MAX": 8}}}))
    with pytest.raises(SystemExit, match="has no setting QUERY_BLOCK_MAX"):
        apply_settings(tmp_path / "typo.json")
    with pytest.raises(SystemExit, match="cannot read the kernel settings"):
        apply_settings(tmp_path / "missing.json")


def test_kernels_off_by_default_stay_off_whatever_the_environment_adds(monkeypatch):
    """ops/triton's OFF_BY_DEFAULT (where a GPU run's tuning found a kernel slower than torch's ops) is off with no
    MEGALODON_DISABLE_TRITON, and stays off beside the ops it names."""
    import megalodon.ops.triton as dispatch

    monkeypatch.setattr(dispatch, "OFF_BY_DEFAULT", frozenset({"norm_rows"}))
    monkeypatch.delenv(dispatch.DISABLE_ENV, raising=False)
    assert dispatch.disabled_ops() == {"norm_rows"}
    monkeypatch.setenv(dispatch.DISABLE_ENV, "cema")
    assert dispatch.disabled_ops() == {"cema", "norm_rows"}
    monkeypatch.setenv(dispatch.DISABLE_ENV, "all")
    assert dispatch.disabled_ops() == {"all"}


def test_tuning_runs_every_group_on_cpu_and_bench_gpu_takes_its_file(tmp_path):
    """gpu_tuning.py's CPU smoke run (the tiny preset, the PyTorch paths) times every group and writes a file that
    bench_gpu.py --kernel-settings applies; on CUDA it refuses to run without a GPU."""
    pytest.importorskip("triton")
    settings = tmp_path / "settings.json"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_tuning.py"), "--device", "cpu", "--out",
                          str(settings)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    written = json.loads(settings.read_text())
    # on the CPU both paths of a pair are PyTorch's, so noise may turn the CEMA's or the norm's kernels "off", and
    # then their tilings are not tuned (test_tuning_spends_its_time_where_it_decides_most)
    tilings = {"cema": {"CEMA chunk runs (step kernels, matrix products)", "CEMA steps per chunk",
                        "CEMA tile prefetch (forward, adjoint)",
                        "CEMA backward (two passes a chunk, one, matrix products)",
                        "CEMA step kernels' registers a thread"},
               "timestep_norm": {"TimestepNorm scan tiles (tokens x groups, warps, segments)"}}
    assert set(written["timings"]) == {"chunk attention's query blocks", "decode GEMM kernel's outputs a program",
                                       "silu_gate kernels (their ops)", "norm_rows kernels (their ops)",
                                       "causal_softmax kernels (their ops)", "queries_keys kernels (their ops)",
                                       "add_linear kernels (their ops)",
                                       "cema kernels (their ops)", "timestep_norm kernels (their ops)",
                                       *(group for kernel in tilings if kernel not in written["disable"]
                                         for group in tilings[kernel])}
    assert all(math.isfinite(ms) for times in written["timings"].values() for ms in times.values())
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--strict", "--sections",
         "env", "--out", str(tmp_path), "--kernel-settings", str(settings)], capture_output=True, text=True,
        timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_tuning.py"), "--out", "unused.json"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode != 0 and "there is none here" in out.stderr


def test_gpu_session_tuned_dry_runs_on_cpu(tmp_path):
    """gpu_session.sh tuned as a dry run (the CPU smoke modes of both scripts): the tuning writes its settings,
    bench_gpu.py applies them in each section's process (not in the sections run after, with the defaults), and
    every file the device tool would bring back is there."""
    pytest.importorskip("triton")
    env = {**os.environ, "BENCH_ARGS": "--device cpu", "TUNE_ARGS": "--device cpu", "OUT": str(tmp_path),
           "PYTHON": sys.executable, "REST_SECTIONS": "train-eager"}  # (the others compile: 30 s more here)
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "tuned"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench_gpu_partrest.md", "bench_gpu_parttuned.md", "kernel-settings.json", "results_partrest.json",
        "results_parttuned.json", "tuning.md"]
    assert out.stdout.count("Kernel settings from") == 2
    assert "kernel_settings" in json.loads((tmp_path / "results_parttuned.json").read_text())
    assert "kernel_settings" not in json.loads((tmp_path / "results_partrest.json").read_text())
