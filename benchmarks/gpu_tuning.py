"""Pick the Triton kernels' tunable settings on this GPU, then let bench_gpu.py run with them.

    python benchmarks/gpu_tuning.py --out kernel-settings.json --deadline 75     # on a GPU (gpu_session.sh tuned)
    python benchmarks/bench_gpu.py --kernel-settings kernel-settings.json ...

The kernels' tiling constants (the CEMA's steps per chunk and tile prefetch, the TimestepNorm scans' tiles and
segments, the chunk attention's query blocks) and whether the kernels that replace a few of torch's ops (the SiLU
gates', the row norms', the attention's masked softmax, the queries' and keys') beat those ops were chosen without a
GPU. This times each op alone at mega200M's 4K training shape, forward and backward, by the GPU's own time (the
kernels' sum from torch.profiler over a few runs: the host's gaps, which a graphed step does not have, left out;
a kernel against torch's ops, whose paths differ in how many kernels they launch, as CUDA-graph replays, gaps
between kernels included; the CEMA's and the TimestepNorm's kernels against their PyTorch paths too),
tries each candidate of a group in turn, and keeps the fastest where it beats the default by more than MARGIN (else
the default stays: noise must not move a setting). Candidates run most promising first and nothing new starts past
--deadline, so the choice is the best of what was timed.

The JSON holds {"modules": {module: {NAME: value}}, "disable": [op, ...], "timings": {group: {candidate: ms}}}.
`apply_settings` sets the modules' attributes (each read at call time) and adds `disable` to
MEGALODON_DISABLE_TRITON; bench_gpu.py calls it before any section, so that every model it builds runs with them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from megalodon import MegalodonConfig

MARGIN = 0.03  # a candidate replaces the default only if its GPU time is this much lower
RUNS = 3  # runs of an op under one profile; its time is their mean

CEMA = "megalodon.ops.triton.cema"
NORM = "megalodon.ops.triton.timestep_norm"
ATTENTION = "megalodon.ops.attention"
DISPATCH = "megalodon.ops.triton"


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


def replayed_time(run: Callable[[], object], replays: int = 10) -> float:
    """ms per run() replayed from a CUDA graph, between CUDA events: what a graphed training step pays for the op,
    the GPU's gaps between its kernels included, which a kernel sum leaves out and which weigh most for the path
    of many small kernels (the PyTorch paths that the Triton kernels replace)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: lazy initializations, Triton's compiles
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def paths_time(runs: list[Callable[[], None]], device: str, disable: dict[str, str]) -> tuple[dict[str, float], str]:
    """Each path's ms (the sum over `runs`), each path under its MEGALODON_DISABLE_TRITON value: replayed from
    CUDA graphs on a GPU, or, where a capture fails, every path by the kernels' sum (one method for all paths)."""
    from megalodon.ops.triton import DISABLE_ENV

    def measure(timer) -> dict[str, float]:
        times = {}
        for path, value in disable.items():
            with environment(DISABLE_ENV, value):
                times[path] = sum(timer(run) for run in runs)
        return times

    if device == "cuda":
        try:
            return measure(replayed_time), "graph replays"
        except Exception as err:  # a path that cannot be captured: compare by kernel sums instead
            print(f"(a capture failed, {type(err).__name__}: {str(err)[:160]}; timed by the kernels' sum)")
    return measure(lambda run: op_time(run, device)), "kernels' sum" if device == "cuda" else "wall clock"


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


class Shape(NamedTuple):
    """What the ops are timed at: a preset's widths (mega200M's: the issue's), a length, a device."""

    config: MegalodonConfig
    length: int
    device: str


# ---- the ops, forward and backward, as a training step runs them --------------------------------------------------
def cema_op(shape: Shape) -> Callable[[], None]:
    """The CEMA on the fp32 input the MEGA layer gives it."""
    from megalodon.layers.cema import CEMA

    cfg = shape.config
    torch.manual_seed(0)
    layer = CEMA(cfg.model_dim, cfg.cema_ndim).to(shape.device)
    x = torch.randn(1, shape.length, cfg.model_dim, device=shape.device, requires_grad=True)

    def run() -> None:
        y, _ = layer(x, None, cfg.chunk_size, None)
        y.backward(torch.ones_like(y))
        x.grad = None
        layer.zero_grad(set_to_none=True)

    return run


def norm_op(shape: Shape) -> Callable[[], None]:
    """The TimestepNorm on the fp32 residual stream, blocks of the chunk size."""
    from megalodon.layers.timestep_norm import TimestepNorm

    cfg = shape.config
    torch.manual_seed(0)
    norm = TimestepNorm(cfg.model_dim, cfg.norm_num_groups, cfg.norm_eps).to(shape.device)
    x = (torch.randn(1, shape.length, cfg.model_dim, device=shape.device) * 2 + 1).requires_grad_()
    dy = torch.randn(1, shape.length, cfg.model_dim, device=shape.device)

    def run() -> None:
        y, _ = norm(x, None, cfg.chunk_size)
        y.backward(dy)
        x.grad = None
        norm.zero_grad(set_to_none=True)

    return run


def attention_op(shape: Shape) -> Callable[[], None]:
    """The chunk attention (bf16, values through SiLU) as a graphed step runs it."""
    from megalodon.ops import attention

    cfg = shape.config
    heads, dz, dv = cfg.num_heads, cfg.head_z_dim, cfg.head_value_dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, shape.length, heads, d, device=shape.device, dtype=torch.bfloat16, requires_grad=True)
               for d in (dz, dz, dv))
    q.data.mul_(dz ** -0.5)
    grad = torch.ones(1, shape.length, heads, dv, device=shape.device, dtype=torch.bfloat16)

    def run() -> None:
        with attention.launches_without_host_cost():
            attention.chunked_attention(q, k, v, cfg.chunk_size, silu_values=True)[0].backward(grad)
        for t in (q, k, v):
            t.grad = None

    return run


def queries_keys_op(shape: Shape) -> Callable[[], None]:
    """q and k from z (bf16, as the linears give it): its per-head norm, affine and rotary, both ways."""
    from megalodon.ops.attention import queries_keys, rotary_angles

    cfg = shape.config
    heads, dz = cfg.num_heads, cfg.head_z_dim
    torch.manual_seed(0)
    z = torch.randn(1, shape.length, heads * dz, device=shape.device, dtype=torch.bfloat16, requires_grad=True)
    scale, shift = (torch.randn(2, heads * dz, device=shape.device, requires_grad=True) for _ in range(2))
    freqs = 10000.0 ** (-torch.arange(0, dz, 2, device=shape.device, dtype=torch.float32) / dz)
    rotation = rotary_angles(torch.arange(shape.length, device=shape.device) % cfg.chunk_size, freqs, torch.float32)
    grads = [torch.randn(1, shape.length, heads, dz, device=shape.device, dtype=torch.bfloat16) for _ in range(2)]

    def run() -> None:
        torch.autograd.backward(queries_keys(z, heads, cfg.norm_eps, scale, shift, rotation), grads)
        for t in (z, scale, shift):
            t.grad = None

    return run


def kernels_to_turn_off(shape: Shape, deadline: float, timings: dict) -> list[str]:
    """Each of the kernels that replace a few of torch's ops against those ops, forward and backward: the SiLU
    gates' and the row norms' (bench_fused.py's four ops, each kernel's two summed), the attention's masked
    softmax (in the chunk attention) and the queries' and keys' (their norm, affine and rotary); then the CEMA's
    and the TimestepNorm's kernels against their PyTorch paths (the CEMA's: chunked Toeplitz matmuls on cuBLAS and
    a scan over chunks, ops/cema.py's cema_chunked). Each pair timed as graph replays (replayed_time), the way the
    graphed step runs them. A kernel slower than torch's ops by more than MARGIN is turned off."""
    import bench_fused  # beside this file

    from megalodon.ops.triton import DISABLE_ENV

    if time.perf_counter() > deadline:
        print("(past the deadline: the kernels against torch's ops not timed)")
        return []
    kernel_of = {"output gate": "silu_gate", "FFN SiLU": "silu_gate", "RMSNorm": "norm_rows", "LayerNorm": "norm_rows"}
    # the CEMA first (the most GPU time of these kernels in the first H100 trace), should the deadline cut the rest
    ops: dict[str, list[Callable[[], None]]] = {"cema": [cema_op(shape)], "timestep_norm": [norm_op(shape)]}
    for label, run in bench_fused.cases(shape.config, shape.length, shape.device).items():
        ops.setdefault(kernel_of[label], []).append(run)
    ops["causal_softmax"] = [attention_op(shape)]
    ops["queries_keys"] = [queries_keys_op(shape)]
    saved = os.environ.get(DISABLE_ENV, "")
    off = []
    # each kernel timed on, even one that ops/triton's OFF_BY_DEFAULT holds off (a run may find it faster now)
    with module_settings(DISPATCH, {"OFF_BY_DEFAULT": frozenset()}):
        for kernel, runs in ops.items():
            if time.perf_counter() > deadline:
                print(f"(past the deadline: the {kernel} kernels not timed)")
                break
            paths = {"triton": saved, "torch": ",".join(filter(None, [saved, kernel]))}
            times, method = paths_time(runs, shape.device, paths)
            name = f"{kernel} kernels (their ops)"
            timings[name] = times
            pick = choose(times, "triton")
            report(f"{name}, {method}", times, pick)
            if pick == "torch":
                off.append(kernel)
    return off


# ---- the groups: (name, module, op, candidates in the order to try, default first) --------------------------------
def groups() -> list[tuple[str, str, Callable[[Shape], Callable[[], None]], dict[str, dict]]]:
    return [
        ("CEMA steps per chunk", CEMA, cema_op,
         {"64": {"CHUNK": 64}, "32": {"CHUNK": 32}}),  # more programs at 4K (128: fewer, not tried)
        ("chunk attention's query blocks", ATTENTION, attention_op,
         {"4": {"QUERY_BLOCKS_MAX": 4}, "8": {"QUERY_BLOCKS_MAX": 8}}),  # 8 skips 7/16 of the products
        ("CEMA tile prefetch (forward, adjoint)", CEMA, cema_op,
         {"forward": {"PREFETCH_FORWARD": True, "PREFETCH_REVERSE": False},
          "both": {"PREFETCH_FORWARD": True, "PREFETCH_REVERSE": True},
          "none": {"PREFETCH_FORWARD": False, "PREFETCH_REVERSE": False}}),
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


def tune(shape: Shape, deadline: float) -> dict:
    """Each group in turn, each candidate on top of the choices made so far; then the gates' and norms' kernels
    against torch's ops. Returns the settings file's content."""
    chosen: dict[str, dict] = {}
    timings: dict[str, dict[str, float]] = {}
    for name, module, make_op, candidates in groups():
        defaults_match(module, candidates)
        run = make_op(shape)
        times: dict[str, float] = {}
        for label, values in candidates.items():
            if time.perf_counter() > deadline:
                print(f"(past the deadline: {name} {label} not timed)")
                break
            try:
                with module_settings(module, {**chosen.get(module, {}), **values}):
                    times[label] = op_time(run, shape.device)
            except Exception as err:  # a candidate that fails to compile or run is not chosen
                print(f"({name} {label} failed: {type(err).__name__}: {str(err)[:200]})")
                times[label] = float("inf")
        if times:
            default = next(iter(candidates))
            pick = choose(times, default)
            timings[name] = times
            if pick != default:
                chosen.setdefault(module, {}).update(candidates[pick])
            report(name, times, pick)
    disable = kernels_to_turn_off(shape, deadline, timings)
    device = torch.cuda.get_device_name() if shape.device == "cuda" else shape.device
    return {"modules": chosen, "disable": disable, "timings": timings, "length": shape.length, "device": device,
            "date": time.strftime("%Y-%m-%d")}


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
    print(f"Kernel settings at {preset}'s widths, {length} tokens: ms a forward + backward (on CUDA the GPU's own, "
          f"the mean of {RUNS} under torch.profiler); a candidate must beat the default by {MARGIN:.0%}\n")
    print("| group | candidates | kept |")
    print("|---|---|---|")
    settings = tune(shape, deadline)
    args.out.write_text(json.dumps(settings, indent=1) + "\n")
    print(f"\nwrote {args.out}: {json.dumps({'modules': settings['modules'], 'disable': settings['disable']})}")


if __name__ == "__main__":
    main()
