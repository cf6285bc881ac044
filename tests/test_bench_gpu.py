"""benchmarks/bench_gpu.py runs on rented GPU time, so its every section is smoke-tested here on the CPU at tiny
sizes: an API change that would break it fails in CI, not on the device."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import interpreted_script

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


def test_append_adds_a_runs_sections_to_the_results_file(tmp_path):
    """gpu_session.sh runs a part in several processes, each adding to the part's results file (--append); without
    --append a run replaces the file."""
    def run(sections, *extra):
        out = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--strict", "--sections",
             sections, "--out", str(tmp_path), "--results-name", "part.json", *extra],
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads((tmp_path / "part.json").read_text())

    assert "env" in run("env")
    appended = run("jax", "--append")
    assert {"env", "jax"} <= appended.keys() and appended["appended"] == [[
        "--device", "cpu", "--strict", "--sections", "jax", "--out", str(tmp_path), "--results-name", "part.json",
        "--append"]]
    assert "env" not in run("jax")


# Runs scripts given as argv lists (JSON in argv[1]) one after another as __main__; prints, as one JSON line, each
# one's output (stdout and stderr) and whether it ended well.
IN_TURN = """
import contextlib, io, json, os, runpy, sys, traceback
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv, out, ok = argv, io.StringIO(), True
    sys.path.insert(0, os.path.dirname(argv[0]))
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as end:
            ok = end.code in (None, 0)
        except Exception:
            ok = False
            traceback.print_exc()
    results.append([ok, out.getvalue()])
print(json.dumps(results))
"""


def scripts_in_turn(commands: list[list[str]], **options) -> list[tuple[bool, str]]:
    """(ended well, output) of each command, run in one interpreter: separate processes would spend most of their
    time importing torch, each."""
    out = subprocess.run([sys.executable, "-c", IN_TURN, json.dumps(commands)], capture_output=True, text=True,
                         **options)
    assert out.returncode == 0, out.stderr[-3000:]
    return [tuple(result) for result in json.loads(out.stdout.splitlines()[-1])]


def test_gpu_session_names_sections_that_exist():
    """benchmarks/gpu_session.sh passes bench_gpu.py section lists: a typo there would cost a GPU session."""
    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    lists = re.findall(r"^\s*bench ([\w,-]+)(?: \d+)?\s*(?:#.*)?$", script, flags=re.MULTILINE)
    lists += re.findall(r"^\s*bench \"\$\{REST_SECTIONS:-([\w,-]+)\}\"$", script, flags=re.MULTILINE)
    assert len(lists) == 7, lists
    results = scripts_in_turn([[str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--sections", sections,
                                "--deadline", "0"] for sections in lists], timeout=120)
    for sections, (ok, out) in zip(lists, results):
        assert ok, out
        assert out.count("past --deadline") == len(sections.split(",")), out


def test_gpu_session_sweep_commands_parse():
    """The sweep (gpu_session.sh sweep) runs its scripts with flags that exist: here on the CPU (the PyTorch row
    only, one query block) at a small shape, the sweep's own flags kept."""
    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    commands = re.findall(r'^\s*"\$PYTHON" (benchmarks/bench_\w+\.py .*)$', script, flags=re.MULTILINE)
    assert len(commands) == 8, commands
    small = {"bench_cema.py": ["--shape", "1,64,32", "--repeats", "1"],
             "bench_fused.py": ["--tokens", "32", "--shrink", "16", "--repeats", "1"],
             "bench_attention.py": ["--shape", "1,64,1,8,16", "--chunk", "32", "--repeats", "1"],
             "bench_timestep_norm.py": ["--shape", "1,64,32", "--groups", "4", "--block", "32", "--repeats", "1"]}
    argvs = []
    for command in commands:
        args = command.replace("--device cuda", "--device cpu").split()
        argvs.append([str(ROOT / args[0]), *args[1:], *small[Path(args[0]).name]])
    results = scripts_in_turn(argvs, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    for argv, (ok, out) in zip(argvs, results):
        assert ok, (argv, out)
        assert ("| 1 |" if "attention" in argv[0] else "| pytorch |") in out, (argv, out)


@pytest.mark.slow
def test_op_counts_counts_the_gpu_path_of_both_models():
    """benchmarks/op_counts.py (a diagnostic for launch-bound GPU steps) on the tiny preset: every row, both
    models, with the Triton kernels on under the interpreter, training on two packed documents."""
    pytest.importorskip("triton")
    out = subprocess.run(
        interpreted_script(ROOT / "benchmarks" / "op_counts.py", "--preset", "tiny", "--dtypes", "fp32",
                           "--shrink", "4", "--chunk", "8", "--length", "16", "--documents"),
        capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Triton kernels on" in out.stdout
    rows = {line.split("|")[1].strip(): [int(v) for v in line.split("|")[3:5]]
            for line in out.stdout.splitlines() if line.startswith(("| training", "| decode"))}
    assert rows.keys() == {"training", "decode"} and all(v > 0 for counts in rows.values() for v in counts)


def test_host_overhead_times_both_models_through_triton_launches():
    """benchmarks/host_overhead.py (the host's share of an eager GPU step, measured on a CPU through triton's own
    launcher with a stand-in driver) on the tiny preset: every kernel compiles for sm_90 and launches, a row per
    model. (Runs this short are too noisy for the figures to mean anything.)"""
    pytest.importorskip("triton")
    compiled_kernels = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--preset", "tiny", "--shrink", "1",
         "--chunk", "16", "--length", "32", "--layers", "2", "--seconds", "0.05", "--rounds", "1"],
        capture_output=True, text=True, timeout=300, env=compiled_kernels)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.stdout.splitlines()
            if line.startswith(("| megalodon", "| llama"))}
    assert rows.keys() == {"megalodon", "llama"} and all(math.isfinite(v) for v in rows.values()), out.stdout


def test_one_models_failure_leaves_the_other_its_row(monkeypatch):
    """A mode that fails for one model (a graph capture, a compilation) still reports the other's figures, and
    names the failure in the failing model's cell."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_training

    from megalodon.baseline import Llama

    train_step = gpu_training.training_step

    def capture_fails_for_the_llama(model, ids, mode):
        if isinstance(model, Llama):
            raise RuntimeError("operation not permitted when stream is capturing")
        return train_step(model, ids, mode)

    monkeypatch.setattr(gpu_training, "training_step", capture_fails_for_the_llama)
    monkeypatch.setattr(gpu_training, "DEVICE", "cpu")
    row = gpu_training.measure_pair("tiny", 32, "eager", checkpoint=False, repeats=1)
    assert row["megalodon"]["tokens_per_s"] > 0
    assert row["llama"] == {"error": "RuntimeError: operation not permitted when stream is capturing"}
    row.update(preset="tiny", length=32, mode="eager", seconds=0.0)
    assert "| RuntimeError: operation not permitted" in gpu_training.train_row(row)


def test_sections_hand_over_their_rows_as_they_go(monkeypatch):
    """A section stopped from outside (gpu_session.sh's timeout) keeps the rows it measured: each row is handed to
    keep() (which writes the results file) as it comes, and a decode position that fails costs only its rows."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gpu
    import gpu_training

    monkeypatch.setattr(gpu_training, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_training, "measure_pair", lambda preset, length, *_: {
        "megalodon": {"tokens_per_s": float(length), "activation_gib": 0.0, "model_tflops": 0.0}})
    kept = []
    rows = gpu_training.section_train(["tiny"], [32, 64], ["eager"], 1, lambda what: False,
                                      keep=lambda rows: kept.append([row["length"] for row in rows]))
    assert kept == [[32], [32, 64]] and [row["length"] for row in rows] == [32, 64]

    # a graphed step cannot hold activation checkpointing (mega1.3B from 16K): that row is skipped, saying why
    monkeypatch.setattr(gpu_training, "DEVICE", "cuda")
    rows = gpu_training.section_train(["mega1.3B"], [4096, 16384], ["graphed"], 1, lambda what: False)
    assert [(row["length"], row["mode"]) for row in rows] == [(4096, "graphed")]
    monkeypatch.setattr(gpu_training, "DEVICE", "cpu")

    def second_position_fails(model, position, steps, modes):
        if position > 64:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return [{"decode_tokens_per_s": 1.0, "ms_per_step": 1.0, "prefill_tokens_per_s": 1.0, "state_bytes": 0}]

    monkeypatch.setattr(bench_gpu, "decode_rows", second_position_fails)
    kept.clear()
    rows = bench_gpu.section_decode("tiny", [64, 300], 4, ["eager"], keep=lambda rows: kept.append(len(rows)))
    assert kept == [1, 2, 3, 4]  # both models, both positions
    assert rows[0]["decode_tokens_per_s"] == 1.0 and rows[1]["error"].startswith("RuntimeError: CUDA error")
    monkeypatch.setattr(bench_gpu, "STRICT", True)  # the smoke test's --strict: the failure fails the run
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench_gpu.section_decode("tiny", [300], 4, ["eager"])


def test_profile_sorts_kernels_by_what_they_belong_to():
    """bench_gpu.py's profile table: CUDA kernel names (as the H100 run's trace spelled them) to their kind; this
    package's Triton kernels by exact name, so that the CEMA's scan_kernel and the norm's scan_fwd_kernel part."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from op_timing import kind_of

    expected = {
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "GEMMs",
        "scan_kernel": "CEMA (Triton)",
        "scan_fwd_kernel": "TimestepNorm (Triton)",
        "causal_softmax_bwd_kernel": "attention: q, k and softmax (Triton)",
        "norm_rows_bwd_kernel": "gates and row norms (Triton)",  # not torch's norms, which "norm" would match
        "silu_gate_kernel": "gates and row norms (Triton)",
        "_step_kernel": "decode steps (Triton)",  # the TimestepNorm's decode step, not its training kernels
        "slot_values_kernel": "decode steps (Triton)",
        "void flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t>>":
            "attention: flash / SDPA",
        "triton_poi_fused__to_copy_add_mul_3": "compiled: fused by Inductor",
        "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda(at::Tensor"
        "Iterator&)::{lambda()#1}::operator()() const>": "copies and casts",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, std::array<char*, "
        "3ul> >": "elementwise",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at::native::(anonymous "
        "namespace)::LogSoftMaxForwardEpilogue>": "softmax (torch)",
        "void at::native::_assert_async_cuda_kernel<bool>(bool const*, at::native::Msg)": "other",
    }
    assert {name: kind_of(name) for name in expected} == expected


def test_every_kernel_of_the_package_has_a_kind_in_the_profile():
    """A Triton kernel added without a row in op_timing.KERNEL_KINDS would fall into "other" in the GPU profile's
    tables, training and decode alike, and its time would go unattributed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from op_counts import triton_kernels
    from op_timing import kind_of

    # what a grid launches, by this package's naming (the @triton.jit helpers they call are jit functions too)
    names = {kernel.fn.__name__ for kernel in triton_kernels() if kernel.fn.__name__.endswith("_kernel")}
    assert len(names) >= 26
    assert {name for name in names if kind_of(name) == "other"} == set()


def run_targets(*args: str) -> list[tuple[str, str, str]]:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_targets.py"), *args], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [tuple(cell.strip() for cell in line.strip("|").split("|")) for line in out.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| target")]


def test_targets_of_the_first_h100_run_read_as_docs_gpu_md_states_them():
    """gpu_targets.py on the first H100 run's own files gives that run's verdicts (docs/gpu.md, "H100
    figures"): best against best across modes, the eager rows' memory, the GPU tests' outcomes."""
    run = ROOT / "benchmarks" / "results" / "h100-2026-11-27"
    rows = run_targets(str(run / "results_part1.json"), str(run / "results_part2.json"),
                       "--tests", str(run / "gpu-tests.txt"))
    verdicts = {target: outcome for target, _, outcome in rows}
    assert list(verdicts.values()) == ["missed", "met", "missed", "missed"] + ["met"] * 7, rows
    measured = {target: value for target, value, _ in rows}
    assert measured[">= 0.95x the Llama at 4K, best against best"].startswith("0.47x (46,419 compiled / 98,164 eager")
    assert measured[">= 1.5x megalodon-jax at 16K"].startswith("1.45x (123,734 eager / 85,264")
    assert measured["activation memory <= 1.0x the Llama's at 32K"].startswith("0.93x")


def test_targets_of_the_h200_run_read_as_docs_gpu_md_states_them():
    """The H200 run's four results files (all, tuned, and the eager table run alone) give docs/gpu.md's "H200
    figures": only the 4K ratio missed, and the compile test that failed there (fixed and passed in a later call)."""
    run = ROOT / "benchmarks" / "results" / "h200-2026-11-30"
    rows = run_targets(*(str(run / f"results_part{part}.json") for part in ("1", "2", "tuned", "eager")),
                       "--tests", str(run / "gpu-tests.txt"))
    verdicts = {target: outcome for target, _, outcome in rows}
    assert list(verdicts.values()) == ["missed"] + ["met"] * 9 + ["missed"], rows
    measured = {target: value for target, value, _ in rows}
    assert measured[">= 0.95x the Llama at 4K, best against best"].startswith(
        "0.80x (182,552 compiled-graphed / 228,927 compiled-graphed")  # the tuned call's (its settings: the defaults)
    assert measured[">= 1.5x the Llama at 32K, best against best"].startswith("2.12x (225,665 graphed / 106,670")
    assert measured["activation memory <= 1.0x the Llama's at 32K"].startswith("0.94x")


def test_targets_read_the_outcomes_of_tests_run_on_several_workers(tmp_path):
    """gpu_session.sh runs the GPU tests on 8 pytest-xdist workers, whose -vv lines put the outcome before the test
    (`[gw1] [ 4%] PASSED path::name`): the first run's log rewritten that way reads as that run did."""
    run = ROOT / "benchmarks" / "results" / "h100-2026-11-27"
    single = (run / "gpu-tests.txt").read_text()
    workers = re.sub(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)\b.*$", r"[gw3] [ 50%] \2 \1", single, flags=re.M)
    assert workers != single and "[gw3] [ 50%] PASSED " in workers
    (tmp_path / "gpu-tests.txt").write_text(workers)
    parts = [str(run / "results_part1.json"), str(run / "results_part2.json")]
    want = run_targets(*parts, "--tests", str(run / "gpu-tests.txt"))
    assert run_targets(*parts, "--tests", str(tmp_path / "gpu-tests.txt")) == want
    assert {outcome for *_, outcome in want} >= {"met"}
    # a test skipped on the GPU measured nothing: not measured, where a failure is missed
    target = "no host sync in a decode step (set_sync_debug_mode)"
    for outcome, verdict in (("SKIPPED", "not measured"), ("FAILED", "missed")):
        changed = re.sub(r"PASSED (\S+::test_cuda_decode_steps_do_not_sync)", rf"{outcome} \1", workers)
        assert changed != workers
        (tmp_path / "gpu-tests.txt").write_text(changed)
        verdicts = {t: v for t, _, v in run_targets(*parts, "--tests", str(tmp_path / "gpu-tests.txt"))}
        assert verdicts[target] == verdict


def test_targets_a_run_did_not_reach_read_not_measured(tmp_path):
    """Part 1 alone, one model failing a mode and no test log: what the files do not show is "not measured", never
    met; a failed row does not count as a measurement."""
    run = ROOT / "benchmarks" / "results" / "h100-2026-11-27"
    part1 = json.loads((run / "results_part1.json").read_text())
    for row in part1["train-eager"]:
        if row["length"] == 4096:
            row["llama"] = {"error": "out of memory"}
    (tmp_path / "part1.json").write_text(json.dumps(part1))
    verdicts = {target: outcome for target, _, outcome in run_targets(str(tmp_path / "part1.json"))}
    assert verdicts[">= 0.95x the Llama at 4K, best against best"] == "not measured"
    assert verdicts["activation memory <= 1.2x the Llama's at 4K"] == "not measured"
    assert verdicts[">= 1.5x megalodon-jax at 4K"] == "not measured"
    assert verdicts[">= 1.5x the Llama at 32K, best against best"] == "missed"  # eager alone: 1.45x
    assert verdicts["torch.compile for training and decode on CUDA"] == "not measured"
    assert verdicts[">= 1,000 tok/s decode, batch 1"] == "met"


def test_bench_memory_counts_both_models():
    """benchmarks/bench_memory.py (the bytes each block keeps for backward) on the tiny preset, with the bytes
    attributed to lines: a row per model, the Llama's ratio 1."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--preset", "tiny",
                          "--lengths", "64", "128", "--by-line"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in out.stdout.splitlines()
            if line.startswith(("| megalodon", "| llama"))}
    assert rows.keys() == {"megalodon", "llama"} and rows["llama"] == "1.00", out.stdout
    assert "timestep_norm" in out.stdout or "cema" in out.stdout, out.stdout  # the lines that saved the bytes


def test_bench_memory_counts_the_loss_both_ways():
    """bench_memory.py --loss: the bytes the head and the loss keep at the preset's own vocabulary, as logits and
    with targets= (ops/loss.py): the logits' fp32 log-probabilities (tokens x vocabulary x 4 bytes) are what the
    blocked loss does not keep, less the fp32 gradient of the head's weight (vocabulary x 1,024 x 4) that it
    keeps instead."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--loss", "--preset",
                          "mega200M", "--lengths", "4096", "8192"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:6] for line in out.stdout.splitlines() if line.startswith(("| megalodon", "| llama"))]
    assert len(rows) == 4, out.stdout
    for _, length, logits, blocked, saved in rows:
        tokens = int(length.replace(",", ""))
        assert float(saved) == pytest.approx(float(logits) - float(blocked), abs=0.011)
        assert float(saved) >= (tokens - 1024) * 32_000 * 4 / 1e9 * 0.95, out.stdout


def test_targets_name_the_rows_of_a_tuned_run(tmp_path):
    """A results file made with kernel settings that changed something: its training rows count as measurements
    of their own, named "(tuned)", beside the default run's."""
    run = ROOT / "benchmarks" / "results" / "h100-2026-11-27"
    part1 = json.loads((run / "results_part1.json").read_text())
    tuned = {"kernel_settings": {"modules": {"megalodon.ops.triton.cema": {"CHUNK": 32}}, "disable": []},
             "train-graphed": [dict(row, megalodon=dict(row["megalodon"], tokens_per_s=1e6), mode="graphed")
                               for row in part1["train-eager"]
                               if row["length"] == 4096 and row["preset"] == "mega200M"]}
    (tmp_path / "tuned.json").write_text(json.dumps(tuned))
    measured = {target: value for target, value, _ in
                run_targets(str(run / "results_part1.json"), str(tmp_path / "tuned.json"))}
    assert "1,000,000 graphed (tuned) /" in measured[">= 0.95x the Llama at 4K, best against best"]
