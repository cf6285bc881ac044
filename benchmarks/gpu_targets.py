"""Issue 11's targets read off a GPU run: each target, what the run measured, and whether it is met.

    python benchmarks/gpu_targets.py OUT/results_part1.json OUT/results_part2.json --tests OUT/gpu-tests.txt

The results files are bench_gpu.py's (gpu_session.sh writes one per part and prints this table at the end of
part 2); --tests is pytest's -vv log of the `-m cuda` tests (part 1's gpu-tests.txt), for the targets that GPU
tests check. Training compares the best configuration of each model, whichever mode gave it (eager, compiled,
graphed, ...); activation memory compares the eager rows, as the issue's own table did, and names the best
configuration's ratio beside it. A target the files say nothing about reads "not measured".
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

PRESET = "mega200M"
DECODE_RATE, DECODE_EQUAL = 1000.0, 0.9  # tok/s; the 1M position's rate over the 2K position's, at least


def training_rows(results: list[dict]) -> list[dict]:
    """Every training row of every train section (train, train-eager, train-graphed, ...) of every file; a row of
    a run with kernel settings that changed anything (gpu_tuning.py) has " (tuned)" after its mode."""
    found = []
    for result in results:
        settings = result.get("kernel_settings") or {}
        tuned = bool(settings.get("modules") or settings.get("disable"))
        for name, rows in result.items():
            if (name == "train" or name.startswith("train-")) and isinstance(rows, list):
                found += [{**row, "mode": f"{row['mode']} (tuned)"} if tuned and "mode" in row else row
                          for row in rows]
    return found


def best(rows: list[dict], arch: str, preset: str, length: int) -> tuple[float, str] | None:
    """The model's fastest row at this shape: (tokens/s, mode)."""
    found = [(row[arch]["tokens_per_s"], row["mode"]) for row in rows
             if row.get("preset") == preset and row.get("length") == length and "tokens_per_s" in row.get(arch, {})]
    return max(found) if found else None


def pair(rows: list[dict], mode: str, preset: str, length: int) -> dict | None:
    """The row of this mode at this shape where both models ran."""
    for row in rows:
        if (row.get("preset"), row.get("length"), row.get("mode")) == (preset, length, mode) and \
                all("tokens_per_s" in row.get(arch, {}) for arch in ("megalodon", "llama")):
            return row
    return None


def gib(row: dict, arch: str) -> str:
    return f"{row[arch]['activation_gib']:.1f}"


def verdict(value: float | None, at_least: float | None = None, at_most: float | None = None) -> str:
    """"not measured" where value is None, else "met" or "missed" by the bound."""
    if value is None:
        return "not measured"
    met = (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
    return "met" if met else "missed"


def speed_targets(rows: list[dict], jax: dict) -> list[tuple[str, str, str]]:
    lines = []
    for length, floor in ((4096, 0.95), (32768, 1.5)):
        mega, llama = best(rows, "megalodon", PRESET, length), best(rows, "llama", PRESET, length)
        ratio = mega[0] / llama[0] if mega and llama else None
        measured = "-" if ratio is None else \
            f"{ratio:.2f}x ({mega[0]:,.0f} {mega[1]} / {llama[0]:,.0f} {llama[1]} tok/s)"
        lines.append((f">= {floor}x the Llama at {length // 1024}K, best against best", measured,
                      verdict(ratio, at_least=floor)))
    for length in (4096, 16384):
        mega, theirs = best(rows, "megalodon", PRESET, length), jax.get(str(length), {}).get("tokens_per_s")
        ratio = mega[0] / theirs if mega and theirs else None
        measured = "-" if ratio is None else f"{ratio:.2f}x ({mega[0]:,.0f} {mega[1]} / {theirs:,.0f} tok/s)"
        lines.append((f">= 1.5x megalodon-jax at {length // 1024}K", measured,
                      verdict(ratio, at_least=1.5)))
    return lines


def memory_targets(rows: list[dict]) -> list[tuple[str, str, str]]:
    lines = []
    for length, ceiling in ((4096, 1.2), (32768, 1.0)):
        row = pair(rows, "eager", PRESET, length)
        ratio = row["megalodon"]["activation_gib"] / row["llama"]["activation_gib"] if row else None
        measured = "-" if row is None else f"{ratio:.2f}x ({gib(row, 'megalodon')} / {gib(row, 'llama')} GiB, eager)"
        fastest = best(rows, "megalodon", PRESET, length)
        both = pair(rows, fastest[1], PRESET, length) if row is not None and fastest else None
        if both is not None and fastest[1] != "eager":  # the fastest configuration's own memory, for the record
            measured += f"; {fastest[1]}: {both['megalodon']['activation_gib'] / both['llama']['activation_gib']:.2f}x"
        lines.append((f"activation memory <= {ceiling}x the Llama's at {length // 1024}K", measured,
                      verdict(ratio, at_most=ceiling)))
    big = [row for row in rows if row.get("preset") == "mega1.3B" and row.get("length") == 32768
           and "tokens_per_s" in row.get("megalodon", {})]
    measured = "-" if not big else "; ".join(
        f"{row['mode']}: {row['megalodon']['tokens_per_s']:,.0f} tok/s, {row['megalodon']['activation_gib']:.1f} GiB"
        for row in big)
    lines.append(("mega1.3B trains at 32K on one 80 GB GPU", measured, "met" if big else "not measured"))
    return lines


def decode_targets(results: list[dict], tests: str | None) -> list[tuple[str, str, str]]:
    rows = [row for result in results for row in result.get("decode", []) if isinstance(row, dict)]
    rates = {}  # position -> (best tok/s, mode)
    for row in rows:
        # the preset: the mega200M (files from before the rows named theirs are mega200M's)
        if row.get("model") == "megalodon" and row.get("preset", PRESET) == PRESET and "decode_tokens_per_s" in row:
            rates[row["position"]] = max(rates.get(row["position"], (0.0, "")),
                                         (row["decode_tokens_per_s"], row["mode"]))
    short, long = rates.get(min(rates)) if rates else None, rates.get(max(rates)) if len(rates) > 1 else None
    lines = [(f">= {DECODE_RATE:,.0f} tok/s decode, batch 1",
              "-" if short is None else f"{short[0]:,.0f} tok/s at {min(rates):,} ({short[1]})",
              verdict(None if short is None else short[0], at_least=DECODE_RATE))]
    ratio = long[0] / short[0] if short and long else None
    lines.append(("decode equal at 2K and 1M", "-" if ratio is None else
                  f"{long[0]:,.0f} at {max(rates):,} / {short[0]:,.0f} at {min(rates):,} = {ratio:.2f}",
                  verdict(ratio, at_least=DECODE_EQUAL)))
    for target, names in (("no host sync in a decode step (set_sync_debug_mode)",
                           ["test_cuda_decode_steps_do_not_sync", "test_cuda_graph_decode_equals_eager_without_syncs",
                            "test_a_cuda_training_step_does_not_sync"]),
                          ("torch.compile for training and decode on CUDA",
                           ["test_compiled_blocks_on_cuda_match_eager", "test_cuda_graph_replay_equals_eager[True]"])):
        outcomes = [test_outcome(tests, name) for name in names]
        measured = ", ".join(f"{name} {outcome or 'not run'}" for name, outcome in zip(names, outcomes))
        # a test skipped (its GPU lacked something) or not reached measured nothing; only a failure misses
        failed = any(o in ("FAILED", "ERROR") for o in outcomes)
        passed = all(o == "PASSED" for o in outcomes)
        lines.append((target, measured if tests is not None else "-",
                      "missed" if failed else "met" if passed else "not measured"))
    return lines


def test_outcome(log: str | None, name: str) -> str | None:
    """PASSED, FAILED, ERROR or SKIPPED for the test in pytest's -vv log, None if it is not there: one process
    writes `path::name PASSED`, pytest-xdist's workers (gpu_session.sh's -n 8) `[gw1] [ 4%] PASSED path::name`."""
    if log is None:
        return None
    outcome, test = "(PASSED|FAILED|ERROR|SKIPPED)", re.escape(name)
    found = re.search(rf"::{test} {outcome}|{outcome} \S*::{test}(?=\s|$)", log, flags=re.M)
    return (found.group(1) or found.group(2)) if found else None


def table(results: list[dict], tests: str | None) -> list[tuple[str, str, str]]:
    rows = training_rows(results)
    jax = next((result["jax"] for result in results if isinstance(result.get("jax"), dict)), {})
    return speed_targets(rows, jax) + memory_targets(rows) + decode_targets(results, tests)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="bench_gpu.py's results files")
    parser.add_argument("--tests", type=Path, default=None, help="pytest's -vv log of the -m cuda tests")
    args = parser.parse_args(argv)
    results = [json.loads(path.read_text()) for path in args.results if path.exists()]
    if not results:
        parser.error(f"none of {[str(p) for p in args.results]} exists: run bench_gpu.py with --out first")
    tests = args.tests.read_text(errors="replace") if args.tests is not None and args.tests.exists() else None
    device = next((r["env"].get("device") for r in results if isinstance(r.get("env"), dict)), "?")
    print(f"## Issue 11's targets ({device}, {results[0].get('date', '?')})\n")
    print("| target | measured | |")
    print("|---|---|---|")
    for target, measured, outcome in table(results, tests):
        print(f"| {target} | {measured} | {outcome} |")


if __name__ == "__main__":
    main()
