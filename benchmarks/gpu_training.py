"""bench_gpu.py's training sections: Megalodon and the matched Llama at one shape, forward + backward, batch 1,
bf16 autocast over fp32 master weights, alternating step by step, in one of four modes:
- eager;
- compiled: each block through torch.compile (the trainer's --compile);
- graphed: the whole step replayed from CUDA graphs (megalodon.training.cuda_graphs.graphed_loss), whose pool then
  holds the activations: the memory column is that pool (activations, temporaries and the graph's static gradient
  buffers, as much again as the parameters in fp32);
- compiled-graphs: the blocks compiled with mode="reduce-overhead" (the trainer's --compile_mode reduce-overhead);
  the memory column is how much torch.compile's pool of CUDA graphs grows: one pool per device, which both
  models share, so Megalodon's figure (captured first) is its own and the Llama's what it needs beyond it;
- compiled-graphed: the blocks compiled (default mode), then the whole step captured by graphed_loss: the
  compiler's fused elementwise kernels without the host's launches.

The device helpers here serve bench_gpu.py's other sections too; use_device() sets the device for all of them.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable

import model_flops
import torch
from gpu_checks import GiB, log

from megalodon.ops.attention import launches_without_host_cost

# (preset, length), most wanted first: the ratio targets at 4K and 32K, then whether mega1.3B trains at 32K on one
# GPU (only with activation checkpointing), then the rest of issue 11's table.
TRAIN_CASES = [("mega200M", 4096), ("mega200M", 32768), ("mega1.3B", 32768), ("mega200M", 16384),
               ("mega1.3B", 4096)]
# Compiling costs 15-25 s per shape and model (the H100 run), so by default only the shapes of the targets: the
# Llama ratios at 4K and 32K, megalodon-jax's at 16K.
COMPILED_CASES = [("mega200M", 4096), ("mega200M", 32768), ("mega200M", 16384)]
# CUDA graphs of the whole step (megalodon.training.cuda_graphs): no compilation, a capture of seconds; they pay
# off where the host bounds the step, at short lengths (docs/gpu.md, "H100 figures").
GRAPHED_CASES = [("mega200M", 4096), ("mega200M", 16384), ("mega200M", 32768), ("mega1.3B", 4096)]
# Both: the targets where the host bounds an eager step (4K) and megalodon-jax's (16K).
COMPILED_GRAPHED_CASES = [("mega200M", 4096), ("mega200M", 16384)]


def train_cases(presets: list[str], lengths: list[int] | None, mode: str) -> list[tuple[str, int]]:
    """The cases of `presets`: at --lengths where given, else the defaults above (4096 for other presets)."""
    if lengths:
        return [(preset, length) for preset in presets for length in lengths]
    defaults = {"compiled": COMPILED_CASES, "graphed": GRAPHED_CASES, "compiled-graphs": COMPILED_CASES[:1],
                "compiled-graphed": COMPILED_GRAPHED_CASES}.get(mode, TRAIN_CASES)
    known = {preset for preset, _ in TRAIN_CASES}
    return [case for case in defaults if case[0] in presets] + [(p, 4096) for p in presets if p not in known]


GRAPHED_MODES = ("graphed", "compiled-graphed")  # the whole step captured by graphed_loss
POOL_MODES = GRAPHED_MODES + ("compiled-graphs",)  # steps replayed from CUDA graphs: their memory is a pool

DEVICE = "cuda"  # bench_gpu.py --device cpu runs every section at tiny sizes: a smoke test without a GPU


def use_device(device: str) -> None:
    global DEVICE
    DEVICE = device


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def autocast():
    return torch.autocast(DEVICE, dtype=torch.bfloat16)


def allocated() -> int:
    return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0


def reserved() -> int:
    """What the caching allocator holds from the device: a CUDA graph's private pool included, whose blocks the
    replays reuse without allocating (memory_allocated sees only what is live between replays)."""
    return torch.cuda.memory_reserved() if DEVICE == "cuda" else 0


def peak_allocated() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def free_cache() -> None:
    gc.collect()  # a graphed step's graphs and pool (and a compiled model's) are freed only by a gc pass
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# ---- models ----------------------------------------------------------------------------------------------------
def build(arch: str, preset: str, seed: int = 0):
    torch.manual_seed(seed)
    # initialized where it runs: a 1.3B model's CPU initialization takes seconds
    return model_flops.build(arch, preset, DEVICE)


def checkpointed(model) -> None:
    from megalodon.training.models import apply_activation_checkpointing

    apply_activation_checkpointing(model)


def loss_of(model, ids):
    """The mean next-token loss as the trainer computes it: by the model, from its last hidden states a block of
    tokens at a time (targets=, ops/loss.py), never holding every logit; both models alike. (Until 2026-11-28 the
    logits and cross_entropy: the first H100 tables' activation columns include the logits and their gradient.)"""
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    return model(ids, targets=targets) / (targets.numel() - targets.shape[0])


# ---- sections --------------------------------------------------------------------------------------------------
def time_step(step) -> tuple[float, float]:
    """Seconds of one forward+backward (step()), and the peak memory it allocated above what was allocated before
    it (GiB)."""
    sync()
    reset_peak()
    before = allocated()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start, (peak_allocated() - before) / GiB


def training_step(model, ids, mode: str):
    """The step to time, after its warm-up (compilation, or the CUDA graphs' capture), and for the modes whose
    steps replay CUDA graphs the memory their pools hold (GiB): a replay allocates nothing, so a timed step's peak
    misses its activations, which live in the pool between steps. The pool is measured as what the allocator
    reserves beyond what it did before the warm-up, each side after a gc pass and empty_cache (which keeps the
    blocks of a live graph's pool and returns the rest)."""
    warmups = 1
    if mode in GRAPHED_MODES:
        from megalodon.training.cuda_graphs import graphed_loss

        if mode == "compiled-graphed":
            model.compile_blocks()  # compiled during graphed_loss's warm-up, before the capture
        free_cache()
        before = reserved()
        graphed = graphed_loss(model, loss_of, [ids])  # bf16 autocast inside the graph, as autocast() gives

        def step():
            graphed(ids).backward()
    else:
        launches = contextlib.nullcontext
        if mode == "compiled":
            model.compile_blocks()  # as the trainer's --compile does
        elif mode == "compiled-graphs":  # --compile true --compile_mode reduce-overhead, as the trainer runs it
            model.compile_blocks(mode="reduce-overhead")
            launches = launches_without_host_cost
            # cudagraph trees run a function eagerly once, record it at the next call and replay from the third
            warmups = 3
            free_cache()
            before = reserved()

        def step():
            with autocast(), launches():
                loss_of(model, ids).backward()
    for _ in range(warmups):  # compilation included
        step()
    if mode not in POOL_MODES:
        return step, None
    model.zero_grad(set_to_none=True)  # the .grad tensors live outside the pools: not part of the figure
    free_cache()
    return step, (reserved() - before) / GiB


def failure(err: Exception) -> str:
    """A short cell for a model whose step failed."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "out of memory"
    return f"{type(err).__name__}: {str(err)[:160]}"


def measure_pair(preset: str, length: int, mode: str, checkpoint: bool, repeats: int) -> dict:
    """Both models at one shape, alternating: each gets a warm-up, then their timed rounds interleave."""
    free_cache()  # the last row's models and graphs (the loop's names held them at its end; cycles need a gc pass)
    row = {}
    models = {}
    for arch in ("megalodon", "llama"):
        model = None
        try:
            model = build(arch, preset)
            if checkpoint:
                checkpointed(model)
            ids = torch.randint(0, model.config.vocab_size, (1, length), device=DEVICE)
            step, held = training_step(model, ids, mode)
            models[arch] = (model, step, held)
        except Exception as err:  # one model's failure (a capture, a compilation) must not cost the other its row
            row[arch] = {"error": failure(err)}
            del model
            free_cache()
    timings = {arch: [] for arch in models}
    for _ in range(repeats):
        for arch, (model, step, _) in models.items():
            if arch in row:
                continue
            # as the trainer's optimizer step leaves them: otherwise each backward adds into every .grad (one
            # kernel per parameter tensor: 280 of 1,917 in a mega200M step at 4K on the H100)
            model.zero_grad(set_to_none=True)
            try:
                timings[arch].append(time_step(step)[0])
            except Exception as err:
                row[arch] = {"error": failure(err)}
    for arch, (model, step, held) in models.items():
        if arch in row or not timings[arch]:
            continue
        try:  # one more step, the gradients left allocated by the last: its peak above them is the activations'
            activation = held if held is not None else time_step(step)[1]
        except Exception as err:
            row[arch] = {"error": failure(err)}
            continue
        best = min(timings[arch])
        flops = model_flops.training_flops_per_token(model, length)
        row[arch] = {"tokens_per_s": length / best, "activation_gib": activation,
                     "model_tflops": flops * length / best / 1e12}
    del models
    free_cache()
    return row


def train_row(row: dict) -> str:
    """One line of the training table."""
    mega, llama = row.get("megalodon", {}), row.get("llama", {})

    def rate(r):
        return f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else r.get("error", "-")

    def act(r):
        return f"{r['activation_gib']:.1f}" if "activation_gib" in r else "-"

    def tflops(r):
        return f"{r['model_tflops']:.1f}" if "model_tflops" in r else "-"

    ratio = (f"{mega['tokens_per_s'] / llama['tokens_per_s']:.2f}"
             if "tokens_per_s" in mega and "tokens_per_s" in llama else "-")
    return (f"| {row['preset']} | {row['length']:,} | {row['mode']} | {rate(mega)} | {rate(llama)} | {ratio} | "
            f"{act(mega)} | {act(llama)} | {tflops(mega)} | {tflops(llama)} | {row['seconds']:.0f} |")


def section_train(presets: list[str], lengths: list[int] | None, modes: list[str], repeats: int,
                  out_of_time: Callable[[str], bool], keep: Callable[[list[dict]], None] = lambda rows: None,
                  checkpoint_from: int = 16384) -> list[dict]:
    """The table's rows; keep(rows) after each, so that a run stopped from outside (the session's timeout) still
    has the rows it measured."""
    log(f"## Training step ({', '.join(modes)}): forward + backward, batch 1, bf16 autocast\n")
    if set(GRAPHED_MODES) & set(modes) and DEVICE != "cuda":
        log("(CUDA graphs need a GPU: the graphed modes are skipped on the CPU; tests/training/test_cuda_graphs.py "
            "checks them against eager on a GPU)\n")
        modes = [mode for mode in modes if mode not in GRAPHED_MODES]
    if {"compiled", "compiled-graphs", "compiled-graphed"} & set(modes):
        # Each length compiles its own static graphs (as a training run of one length would), not one
        # dynamic-shape graph after the second length.
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    log("Model TFLOP/s: matmul FLOPs with causal attention, 3x the forward's (benchmarks/model_flops.py).\n")
    log("| preset | L | mode | Megalodon tok/s | Llama tok/s | ratio | Megalodon act. GiB | Llama act. GiB | "
        "Megalodon TFLOP/s | Llama TFLOP/s | s |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for mode in modes:
        for preset, length in train_cases(presets, lengths, mode):
            checkpoint = preset == "mega1.3B" and length >= checkpoint_from
            label = mode + (" + act. ckpt" if checkpoint else "")
            if checkpoint and mode in GRAPHED_MODES:
                # torch's checkpoint saves the CUDA random state, which a capture refuses; the trainer refuses
                # --cuda_graphs with --activation_checkpointing for the same reason
                log(f"(skipped {preset} at {length} ({mode}): it needs activation checkpointing, which a CUDA graph "
                    "cannot capture)")
                continue
            if out_of_time(f"training {preset} at {length} ({label})"):
                continue
            case_start = time.perf_counter()
            try:
                row = measure_pair(preset, length, mode, checkpoint, repeats)
            except Exception as err:  # a failing mode must not end the run: report it and go on
                row = {arch: {"error": failure(err)} for arch in ("megalodon", "llama")}
            row.update(preset=preset, length=length, mode=label, seconds=time.perf_counter() - case_start)
            rows.append(row)
            keep(rows)
            log(train_row(row))
    log()
    return rows
