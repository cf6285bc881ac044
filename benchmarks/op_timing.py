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


# What a CUDA kernel belongs to, by its name as torch.profiler reports it: Triton kernels by their function's exact
# name (this package's, in ops/triton/), the rest by a part of the name; the first matching row wins.
KERNEL_KINDS = [
    ("CEMA (Triton)", {"tables_kernel", "local_states_kernel", "scan_kernel", "outputs_kernel",
                       "chunk_products_kernel", "parameter_grads_kernel", "adjoint_grads_kernel",
                       "matrix_grads_kernel", "gradients_kernel"}, ()),
    ("TimestepNorm (Triton)", {"moments_kernel", "scan_fwd_kernel", "carry_fwd_kernel", "normalize_kernel",
                               "norm_bwd_kernel", "scan_bwd_kernel", "carry_bwd_kernel", "dx_kernel"}, ()),
    ("attention: q, k and softmax (Triton)", {"qk_fwd_kernel", "qk_bwd_kernel", "causal_softmax_fwd_kernel",
                                              "causal_softmax_bwd_kernel"}, ()),
    ("gates and row norms (Triton)", {"silu_gate_kernel", "silu_gate_bwd_kernel", "norm_rows_kernel",
                                      "norm_rows_bwd_kernel"}, ()),
    ("decode steps (Triton)", {"_cema_step_kernel", "_step_kernel", "slot_scores_kernel", "slot_values_kernel"},
     ()),
    ("attention: flash / SDPA", set(), ("flash", "fmha", "attention", "sdpa")),
    ("GEMMs", {"add_linear_kernel"}, ("nvjet", "gemm", "cutlass", "xmma", "cublas", "sm90_", "sm80_")),
    ("compiled: fused by Inductor", set(), ("triton_poi", "triton_red", "triton_per", "triton_tem")),
    ("norms (torch)", set(), ("norm", "GammaBeta", "RowwiseMoments")),
    ("softmax (torch)", set(), ("softmax", "SoftMax")),
    ("embedding and loss", set(), ("nll_loss", "embedding", "gather", "radix_sort", "segment", "grad_weight",
                                   "unique_by_key", "DeviceScan", "DeviceCompact")),
    ("copies and casts", set(), ("copy", "Copy", "cat")),
    ("reductions", set(), ("reduce_kernel",)),
    ("elementwise", set(), ("elementwise", "Functor", "fill")),
]


def kind_of(kernel: str) -> str:
    """KERNEL_KINDS' name for a CUDA kernel, "other" where none matches."""
    for kind, names, parts in KERNEL_KINDS:
        if kernel in names or any(part in kernel for part in parts):
            return kind
    return "other"


def kernels_by_kind(prof) -> dict[str, tuple[int, float]]:
    """A torch.profiler run's CUDA kernels by KERNEL_KINDS: {kind: (launches, GPU ms)}."""
    kinds: dict[str, tuple[int, float]] = {}
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kind = kind_of(event.key)
        count, ms = kinds.get(kind, (0, 0.0))
        kinds[kind] = (count + event.count, ms + event.self_device_time_total / 1e3)
    return kinds


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
