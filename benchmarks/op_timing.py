"""Timing one op on its own (bench_cema.py, bench_timestep_norm.py): the wall clock, and on CUDA the GPU's own
time and peak memory. The wall clock of a lone op on a GPU is mostly the host's (launches, dispatch), so the
kernels' sum from torch.profiler is the figure to compare kernel variants by."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def kernels(prof) -> tuple[int, float]:
    """A torch.profiler run's CUDA kernel launches and the milliseconds the GPU spent in them."""
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.count for e in events), sum(e.self_device_time_total for e in events) / 1e3


def gpu_ms(run: Callable[[], object]) -> float:
    """Milliseconds the GPU spends in run()'s kernels, the host's gaps left out."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return kernels(prof)[1]


def time_op(run: Callable[[], object], repeats: int, cuda: bool) -> dict:
    """run() once to warm up, then `repeats` times: the median wall-clock ms, and on CUDA the peak memory above
    what was allocated before (MiB) and the GPU's ms of one more run (None elsewhere)."""

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    run()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return {"ms": statistics.median(times) * 1e3, "peak_mib": peak, "gpu_ms": gpu_ms(run) if cuda else None}
