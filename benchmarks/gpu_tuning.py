"""Pick the Triton kernels' tunable settings on this GPU, then let bench_gpu.py run with them.

    python benchmarks/gpu_tuning.py --out kernel-settings.json --deadline 75     # on a GPU (gpu_session.sh tuned)
    python benchmarks/bench_gpu.py --kernel-settings kernel-settings.json ...

The kernels' tiling constants (the CEMA's steps per chunk and tile prefetch, the TimestepNorm scans' tiles and
segments, the chunk attention's query blocks) and whether the kernels that replace a few of torch's ops (the SiLU
gates', the row norms', the attention's masked softmax, the queries' and keys') beat those ops were chosen without a
GPU. This times each op alone at mega200M's 4K training shape, forward and backward, as a graphed training step
runs it: each candidate's runs captured in a CUDA graph, the graphs replayed in turn over ROUNDS rounds (the order
rotating), the median of each (where a capture fails, from then on by the kernels' sum under torch.profiler). It
tries the candidates of each group and keeps the fastest where it beats the default by more than MARGIN (else the
default stays: noise must not move a setting).

The order spends a short --deadline where it matters most: first the CEMA's and the TimestepNorm's kernels against
their PyTorch paths (at the default tilings: a kernel that loses there by more than MARGIN is turned off, and its
tilings are not tuned), then the tilings of the kernels left on, then the other kernels against torch's ops under
the tilings chosen. Nothing new starts past --deadline, and the settings file is written after each group, so
that a run stopped from outside leaves what it chose.

The JSON holds {"modules": {module: {NAME: value}}, "disable": [op, ...], "timings": {group: {candidate: ms}}}.
`apply_settings` sets the modules' attributes (each read at call time) and adds `disable` to
MEGALODON_DISABLE_TRITON; bench_gpu.py calls it before any section, so that every model it builds runs with them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import torch
from tuning_ops import Shape, attention_op, cema_op, decode_linears_op, kernel_ops, norm_op  # beside this file

from megalodon import MegalodonConfig

MARGIN = 0.03  # a candidate replaces the default only if its GPU time is this much lower
RUNS = 3  # runs of an op under one profile, where it is timed by the kernels' sum; its time is their mean
REPLAYS = 10  # graph replays timed together: one sample
ROUNDS = 5  # samples of each candidate, the candidates in turn; a candidate's time is their median

CEMA = "megalodon.ops.triton.cema"
NORM = "megalodon.ops.triton.timestep_norm"
ATTENTION = "megalodon.ops.attention"
DISPATCH = "megalodon.ops.triton"
FUSED = "megalodon.ops.triton.fused"


def choose(timings: dict[str, float], default: str, margin: float = MARGIN) -> str:
    """The candidate to keep: the fastest, if it beats the default by more than `margin`, else the default
    (also when the default was not timed or failed: its time is then infinite and nothing is compared to it)."""
    best = min(timings, key=timings.get)
    reference = timings.get(default, float("inf"))
    if reference == float("inf"):
        return default
    return best if timings[best] < reference * (1.0 - margin) else default


@contextmanager
def module_settings(module: str, values: dict):
    """The module's attributes set to `values` inside, restored after."""
    target = importlib.import_module(module)
    saved = {name: getattr(target, name) for name in values}
    for name, value in values.items():
        setattr(target, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(target, name, value)


@contextmanager
def environment(name: str, value: str):
    """The environment variable set to `value` inside, restored after."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def apply_settings(path: Path) -> dict:
    """Apply a settings file written by this script: each module's attributes, and the ops to turn off added to
    MEGALODON_DISABLE_TRITON. Returns what it applied. A module or attribute that does not exist is refused:
    a setting that silently changed nothing would mislabel every figure measured with it."""
    from megalodon.ops.triton import DISABLE_ENV

    try:
        settings = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"cannot read the kernel settings {path}: {err} (gpu_tuning.py --out writes them)") from err
    for module, values in settings.get("modules", {}).items():
        target = importlib.import_module(module)
        for name, value in values.items():
            if not hasattr(target, name):
                raise SystemExit(f"{path}: {module} has no setting {name}; was the file written by an older "
                                 "gpu_tuning.py? Run it again")
            setattr(target, name, value)
    disable = settings.get("disable", [])
    if disable:
        current = [op for op in os.environ.get(DISABLE_ENV, "").split(",") if op.strip()]
        os.environ[DISABLE_ENV] = ",".join(dict.fromkeys(current + disable))
    return {"modules": settings.get("modules", {}), "disable": disable}


# Set by a failed capture: torch's capture_end may raise before it ends the allocator's capture into the graph's
# pool, so nothing more is captured in this process; what is left is timed by the kernels' sum, and says so.
captures_failed = False

Candidate = tuple[Callable[[], AbstractContextManager], list[Callable[[], None]]]  # (its settings, its runs)


def compare(candidates: dict[str, Candidate], device: str) -> tuple[dict[str, float], str]:
    """ms of each candidate's runs together, each run made under the candidate's settings; ROUNDS samples in turn,
    the order rotating, the median of each. On CUDA a sample is REPLAYS replays of a graph holding the runs (what a
    graphed training step pays, the gaps between kernels included); where a capture fails, the kernels' sum; on
    the CPU the wall clock. A candidate that fails to run gets an infinite time."""
    times = {label: float("inf") for label in candidates}
    samplers: dict[str, Callable[[], float]] = {}
    method = "graph replays" if device == "cuda" else "wall clock"
    if device == "cuda" and not captures_failed:
        samplers = graph_samplers(candidates, times)  # sets captures_failed where a capture fails
    if device != "cuda" or captures_failed:
        method = "kernels' sum" if device == "cuda" else method
        for label, (settings, runs) in candidates.items():
            try:
                with settings():
                    for run in runs:
                        run()  # the warm-up: a failure here is the candidate's
                samplers[label] = lambda settings=settings, runs=runs: sum_time(settings, runs, device)
            except Exception as err:
                print(f"({label} failed: {type(err).__name__}: {str(err)[:200]})")
    samples: dict[str, list[float]] = {label: [] for label in samplers}
    order = list(samplers)
    if not order:
        return times, method
    for round_ in range(ROUNDS):
        for label in order[round_ % len(order):] + order[:round_ % len(order)]:
            samples[label].append(samplers[label]())
    times.update({label: statistics.median(values) for label, values in samples.items()})
    return times, method


def graph_samplers(candidates: dict[str, Candidate],
                   times: dict[str, float]) -> dict[str, Callable[[], float]]:
    """A function timing REPLAYS replays (ms per replay) for each candidate whose runs could be captured; none if a
    capture failed (then every candidate is timed another way: one method for all)."""
    global captures_failed
    graphs = {}
    for label, (settings, runs) in candidates.items():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with settings(), torch.cuda.stream(side):  # lazy initializations and Triton's compiles, off the capture
                for _ in range(2):
                    for run in runs:
                        run()
            torch.cuda.current_stream().wait_stream(side)
        except Exception as err:
            print(f"({label} failed: {type(err).__name__}: {str(err)[:200]})")
            times[label] = float("inf")
            continue
        graph = torch.cuda.CUDAGraph()
        try:
            with settings(), torch.cuda.graph(graph):
                for run in runs:
                    run()
        except Exception as err:
            captures_failed = True
            print(f"(capturing {label} failed, {type(err).__name__}: {str(err)[:160]}; timed by the kernels' sum "
                  "from now on)")
            return {}
        graph.replay()
        graphs[label] = graph

    def sampler(graph: torch.cuda.CUDAGraph) -> Callable[[], float]:
        def sample() -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(REPLAYS):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / REPLAYS
        return sample

    return {label: sampler(graph) for label, graph in graphs.items()}


def sum_time(settings: Callable[[], AbstractContextManager], runs: list[Callable[[], None]],
             device: str) -> float:
    with settings():
        return sum(op_time(run, device) for run in runs)


def op_time(run: Callable[[], object], device: str) -> float:
    """ms per run of run() after a warm-up run: on CUDA the GPU's own time (the mean of RUNS under one profile),
    elsewhere the wall clock's (the CPU smoke test)."""
    from op_timing import gpu_ms  # beside this file

    run()
    if device != "cuda":
        start = time.perf_counter()
        for _ in range(RUNS):
            run()
        return (time.perf_counter() - start) / RUNS * 1e3
    torch.cuda.synchronize()
    return gpu_ms(lambda: [run() for _ in range(RUNS)]) / RUNS


def kernels_to_turn_off(shape: Shape, kernels: list[str], deadline: float, timings: dict,
                        save: Callable[[], None]) -> list[str]:
    """Each of `kernels` against the ops it replaces, forward and backward (compare: as graph replays, the way the
    graphed step runs them). A kernel slower than them by more than MARGIN is turned off. A kernel that
    MEGALODON_DISABLE_TRITON already turns off (its tests failed on this GPU) is not timed."""
    from megalodon.ops.triton import DISABLE_ENV

    saved = os.environ.get(DISABLE_ENV, "")
    builders = kernel_ops(shape)
    off = []
    for kernel in kernels:
        if time.perf_counter() > deadline:
            print(f"(past the deadline: the {kernel} kernels not timed)")
            break
        if kernel in {op.strip() for op in saved.split(",")}:
            print(f"({kernel}: off already, by {DISABLE_ENV}={saved})")
            continue
        try:
            runs = builders[kernel]()
            paths = {path: (lambda value=value: environment(DISABLE_ENV, value), runs)
                     for path, value in (("triton", saved), ("torch", ",".join(filter(None, [saved, kernel]))))}
            times, method = compare(paths, shape.device)
        except Exception as err:  # one kernel's failure leaves the others their comparisons
            print(f"({kernel} kernels against their ops failed: {type(err).__name__}: {str(err)[:200]})")
            continue
        name = f"{kernel} kernels (their ops)"
        timings[name] = times
        pick = choose(times, "triton")
        report(f"{name}, {method}", times, pick)
        if pick == "torch":
            off.append(kernel)
        save()
    return off


# ---- the groups: (name, module, op, candidates in the order to try, default first) --------------------------------
def groups() -> list[tuple[str, str, Callable[[Shape], Callable[[], None]], dict[str, dict]]]:
    return [
        # the CEMA's chunk runs as small products on tensor cores (16-step sub-blocks) instead of step by step on
        # CUDA cores, at 4 channels a program (163-244 registers on sm_90) or 2; each tiling is four kernel
        # variants to compile, so few are tried
        ("CEMA chunk runs (step kernels, matrix products)", CEMA, cema_op,
         {"steps": {"MATRIX_FORM": False},
          "products 4x16": {"MATRIX_FORM": True, "MATRIX_BLOCK_D": 4, "MATRIX_ROWS": 16, "WARPS_MATRIX": 4},
          "products 2x16": {"MATRIX_FORM": True, "MATRIX_BLOCK_D": 2, "MATRIX_ROWS": 16, "WARPS_MATRIX": 4}}),
        # 2,048 one-warp programs at 4K took 1.3 waves of an H200's SMs: 96 (1,376 programs, partial last chunk)
        # and 128 (1,024) fit one; 32 makes more, shorter ones
        ("CEMA steps per chunk", CEMA, cema_op,
         {"64": {"CHUNK": 64}, "32": {"CHUNK": 32}, "96": {"CHUNK": 96}, "128": {"CHUNK": 128}}),
        # n blocks skip (n - 1) / 2n of the products for 9 launches a block (forward and backward); 8 lost to 4
        # on the H200, whose run never timed fewer
        ("chunk attention's query blocks", ATTENTION, attention_op,
         {"4": {"QUERY_BLOCKS_MAX": 4}, "8": {"QUERY_BLOCKS_MAX": 8}, "2": {"QUERY_BLOCKS_MAX": 2},
          "1": {"QUERY_BLOCKS_MAX": 1}}),
        ("CEMA tile prefetch (forward, adjoint)", CEMA, cema_op,
         {"forward": {"PREFETCH_FORWARD": True, "PREFETCH_REVERSE": False},
          "both": {"PREFETCH_FORWARD": True, "PREFETCH_REVERSE": True},
          "none": {"PREFETCH_FORWARD": False, "PREFETCH_REVERSE": False}}),
        ("CEMA backward (two passes a chunk, one, matrix products)", CEMA, cema_op,
         {"two": {"FUSED_BACKWARD": False, "MATRIX_BACKWARD": False},
          "one": {"FUSED_BACKWARD": True, "MATRIX_BACKWARD": False},
          "products": {"MATRIX_BACKWARD": True}}),
        ("CEMA step kernels' registers a thread", CEMA, cema_op,
         {"as needed": {"STEP_REGISTERS": None}, "128": {"STEP_REGISTERS": 128}}),  # 128: one wave at 4K
        ("decode GEMM kernel's outputs a program", FUSED, decode_linears_op,
         {"1": {"ADD_LINEAR_BLOCK": 1}, "2": {"ADD_LINEAR_BLOCK": 2}, "4": {"ADD_LINEAR_BLOCK": 4}}),
        ("TimestepNorm scan tiles (tokens x groups, warps, segments)", NORM, norm_op,
         {"256x8, 4, 32": dict(SCAN_TOKENS=256, SCAN_GROUPS=8, SCAN_WARPS=4, SCAN_SEGMENTS=32),
          "256x8, 4, 8": dict(SCAN_TOKENS=256, SCAN_GROUPS=8, SCAN_WARPS=4, SCAN_SEGMENTS=8),
          "1024x2, 4, 32": dict(SCAN_TOKENS=1024, SCAN_GROUPS=2, SCAN_WARPS=4, SCAN_SEGMENTS=32),
          "64x8, 4, 64": dict(SCAN_TOKENS=64, SCAN_GROUPS=8, SCAN_WARPS=4, SCAN_SEGMENTS=64)}),
    ]


def defaults_match(module: str, candidates: dict[str, dict]) -> None:
    """The first candidate of a group must be the module's own setting (the one a win has to beat)."""
    target = importlib.import_module(module)
    first = next(iter(candidates.values()))
    actual = {name: getattr(target, name) for name in first}
    if actual != first:
        raise SystemExit(f"gpu_tuning.py: {module}'s settings are {actual}, its first candidate {first}: put the "
                         "module's own first")


def tune(shape: Shape, deadline: float, write: Callable[[dict], None] = lambda settings: None) -> dict:
    """The CEMA's and the TimestepNorm's kernels against their PyTorch paths; the groups of tilings of the kernels
    left on, each candidate on top of the choices made so far; then the other kernels against torch's ops under
    the tilings chosen. Every kernel is timed on, even one that ops/triton's OFF_BY_DEFAULT holds off (a run may
    find it faster now). Returns the settings file's content, which write() gets after each group too."""
    chosen: dict[str, dict] = {}
    timings: dict[str, dict[str, float]] = {}
    disable: list[str] = []
    device = torch.cuda.get_device_name() if shape.device == "cuda" else shape.device
    settings = {"modules": chosen, "disable": disable, "timings": timings, "length": shape.length, "device": device,
                "date": time.strftime("%Y-%m-%d")}

    def save() -> None:
        write(settings)

    owner = {CEMA: "cema", NORM: "timestep_norm"}  # the kernels whose tilings the groups tune
    with module_settings(DISPATCH, {"OFF_BY_DEFAULT": frozenset()}):
        # the CEMA first (the most GPU time of these kernels in the first H100 trace), should the deadline cut more
        disable += kernels_to_turn_off(shape, list(owner.values()), deadline, timings, save)
        for name, module, make_op, candidates in groups():
            if owner.get(module) in disable:
                print(f"({name}: its kernel is turned off)")
                continue
            defaults_match(module, candidates)
            if time.perf_counter() > deadline:
                print(f"(past the deadline: {name} not timed)")
                continue
            try:
                run = make_op(shape)
                times, method = compare(
                    {label: (lambda values=values: module_settings(module, {**chosen.get(module, {}), **values}),
                             [run]) for label, values in candidates.items()}, shape.device)
            except Exception as err:  # a group that cannot run leaves its default
                print(f"({name} failed: {type(err).__name__}: {str(err)[:200]})")
                continue
            default = next(iter(candidates))
            pick = choose(times, default)
            timings[name] = times
            if pick != default:
                chosen.setdefault(module, {}).update(candidates[pick])
            report(f"{name}, {method}", times, pick)
            save()
        with ExitStack() as chosen_settings:
            for module, values in chosen.items():
                chosen_settings.enter_context(module_settings(module, values))
            others = [kernel for kernel in kernel_ops(shape) if kernel not in owner.values()]
            disable += kernels_to_turn_off(shape, others, deadline, timings, save)
    save()
    return settings


def report(name: str, times: dict[str, float], pick: str) -> None:
    cells = ", ".join(f"{label} {ms:.3f} ms" for label, ms in times.items())
    print(f"| {name} | {cells} | **{pick}** |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the settings file to write (JSON)")
    parser.add_argument("--length", type=int, default=4096, help="tokens of the timed ops (default 4096)")
    parser.add_argument("--deadline", type=float, default=75.0, help="seconds after which nothing new is timed")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke test of this script at the tiny preset (the PyTorch paths, wall clock)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_tuning.py times Triton kernels on a CUDA GPU; there is none here (--device cpu only "
                         "smoke-tests the script)")
    preset, length = ("mega200M", args.length) if args.device == "cuda" else ("tiny", 64)
    shape = Shape(MegalodonConfig.from_preset(preset), length, args.device)
    deadline = time.perf_counter() + args.deadline
    print(f"Kernel settings at {preset}'s widths, {length} tokens: ms a forward + backward (on CUDA the median of "
          f"{ROUNDS} samples of {REPLAYS} graph replays); a candidate must beat the default by {MARGIN:.0%}\n")
    print("| group | candidates | kept |")
    print("|---|---|---|")
    settings = tune(shape, deadline, lambda settings: args.out.write_text(json.dumps(settings, indent=1) + "\n"))
    print(f"\nwrote {args.out}: {json.dumps({'modules': settings['modules'], 'disable': settings['disable']})}")


if __name__ == "__main__":
    main()
