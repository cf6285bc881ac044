"""GPU speed and memory: Megalodon against the matched Llama on one CUDA device, in one run (issue #8's table).

    python benchmarks/bench_gpu.py                       # everything (gpu_session.sh runs it in two parts)
    python benchmarks/bench_gpu.py --sections train --presets mega200M --lengths 4096
    python benchmarks/bench_gpu.py --out results/        # also write results.json and a profile there

Sections, in the order they run by default (most wanted first: a run cut short still has the main figures):
- env:    the device, torch/triton/CUDA versions, which Triton kernels are on;
- parity: the CUDA model (Triton kernels, fp32) against the CPU fp32 model: logits and gradients; bf16 autocast
          against fp32; split invariance on CUDA;
- train-graphed, train-eager, later train-compiled (or train, for every --modes): forward + backward (no
          optimizer), batch 1, bf16 autocast over fp32 master weights, both models alternating step by step;
          tokens/s, the ratio, activation memory. "graphed" replays the whole step from CUDA graphs
          (megalodon.training.cuda_graphs), whose pool then holds the activations: its memory column is that
          pool (activations, temporaries and the gradients' static buffers). train-compiled-graphs: the blocks
          compiled with mode="reduce-overhead" (cudagraph trees), mega200M at 4K;
- decode: tokens/s at batch 1 after prefilling 2K and 1M tokens, both models (the Llama up to its KV memory),
          each from one prefill: the step replayed from a CUDA graph, eager and compiled (--modes);
- profile: the top CUDA kernels of one mega200M 4K step (torch.profiler), written under --out, and the kernel
          launches of one step of each model (what benchmarks/op_counts.py predicts on the CPU);
- jax:    megalodon-jax at the mega200M shape with bf16 compute, when it is installed (a separate process: JAX
          and PyTorch must not share the GPU's memory pools);
- hf:     transformers' generate() against the core's static decode, Megalodon at the first decode position
          (bench_hf.py).

--deadline SECONDS skips what would start after that many seconds (each skip is logged), so that a run under an
outer time limit ends on its own with its results written.

Activation memory is the peak allocated during the step minus what was allocated before it (weights and
gradients included in the baseline), so it counts activations and temporaries only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import bench_jax  # beside this file
import gpu_checks
import model_flops
import torch
import torch.nn.functional as F
from gpu_checks import GiB, log

# (preset, length), most wanted first: the ratio targets at 4K and 32K, then whether mega1.3B trains at 32K on one
# GPU (only with activation checkpointing), then the rest of issue 11's table.
TRAIN_CASES = [("mega200M", 4096), ("mega200M", 32768), ("mega1.3B", 32768), ("mega200M", 16384),
               ("mega1.3B", 4096)]
# Compiling costs 15-25 s per shape and model (the H100 run), so by default only the shapes of the targets: the
# Llama ratios at 4K and 32K, megalodon-jax's at 16K.
COMPILED_CASES = [("mega200M", 4096), ("mega200M", 32768), ("mega200M", 16384)]
# CUDA graphs of the whole step (megalodon.training.cuda_graphs): no compilation, a capture of seconds; they pay
# off where the host bounds the step, at short lengths (docs/benchmarks.md, "H100 figures").
GRAPHED_CASES = [("mega200M", 4096), ("mega200M", 16384), ("mega200M", 32768), ("mega1.3B", 4096)]


def train_cases(presets: list[str], lengths: list[int] | None, mode: str) -> list[tuple[str, int]]:
    """The cases of `presets`: at --lengths where given, else the defaults above (4096 for other presets)."""
    if lengths:
        return [(preset, length) for preset in presets for length in lengths]
    defaults = {"compiled": COMPILED_CASES, "graphed": GRAPHED_CASES, "compiled-graphs": COMPILED_CASES[:1]}.get(
        mode, TRAIN_CASES)
    known = {preset for preset, _ in TRAIN_CASES}
    return [case for case in defaults if case[0] in presets] + [(p, 4096) for p in presets if p not in known]


DEVICE = "cuda"  # --device cpu runs every section at --tiny sizes: a smoke test of this script without a GPU
DEADLINE = float("inf")  # time.perf_counter() after which nothing new starts (--deadline)


def out_of_time(what: str) -> bool:
    if time.perf_counter() < DEADLINE:
        return False
    log(f"(skipped {what}: past --deadline)")
    return True


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def autocast():
    return torch.autocast(DEVICE, dtype=torch.bfloat16)


def allocated() -> int:
    return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0


def peak_allocated() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def free_cache() -> None:
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
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


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
    """The step to time, after its warm-up (compilation, or the CUDA graphs' capture), and for "graphed" the
    memory its graphs hold (GiB; their pool keeps the activations between steps, so the step's own peak is 0)."""
    if mode == "graphed":
        from megalodon.training.cuda_graphs import graphed_loss

        before = allocated()
        graphed = graphed_loss(model, loss_of, [ids])  # bf16 autocast inside the graph, as autocast() gives

        def step():
            graphed(ids).backward()
    else:
        if mode == "compiled":
            model.compile_blocks()  # as the trainer's --compile does
        elif mode == "compiled-graphs":  # --compile true --compile_mode reduce-overhead
            model.compile_blocks(mode="reduce-overhead")

        def step():
            with autocast():
                loss_of(model, ids).backward()
    step()  # warm-up, compilation included
    held = (allocated() - before) / GiB if mode == "graphed" else None
    return step, held


def measure_pair(preset: str, length: int, mode: str, checkpoint: bool, repeats: int) -> dict:
    """Both models at one shape, alternating: each gets a warm-up, then their timed rounds interleave."""
    row = {}
    models = {}
    for arch in ("megalodon", "llama"):
        try:
            model = build(arch, preset)
            if checkpoint:
                checkpointed(model)
            ids = torch.randint(0, model.config.vocab_size, (1, length), device=DEVICE)
            step, held = training_step(model, ids, mode)
            models[arch] = (model, step, held)
        except torch.cuda.OutOfMemoryError:
            row[arch] = {"error": "out of memory"}
            models.pop(arch, None)
            free_cache()
    timings = {arch: [] for arch in models}
    for _ in range(repeats):
        for arch, (model, step, _) in models.items():
            # as the trainer's optimizer step leaves them: otherwise each backward adds into every .grad (one
            # kernel per parameter tensor: 280 of 1,917 in a mega200M step at 4K on the H100)
            model.zero_grad(set_to_none=True)
            try:
                timings[arch].append(time_step(step)[0])
            except torch.cuda.OutOfMemoryError:
                row[arch] = {"error": "out of memory"}
    for arch, (model, step, held) in models.items():
        if arch in row or not timings[arch]:
            continue
        try:  # one more step, the gradients left allocated by the last: its peak above them is the activations'
            activation = held if held is not None else time_step(step)[1]
        except torch.cuda.OutOfMemoryError:
            row[arch] = {"error": "out of memory"}
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
                  checkpoint_from: int = 16384) -> list[dict]:
    log(f"## Training step ({', '.join(modes)}): forward + backward, batch 1, bf16 autocast\n")
    if "graphed" in modes and DEVICE != "cuda":
        log("(CUDA graphs need a GPU: the graphed mode is skipped on the CPU; tests/training/test_cuda_graphs.py "
            "checks it against eager on a GPU)\n")
        modes = [mode for mode in modes if mode != "graphed"]
    if {"compiled", "compiled-graphs"} & set(modes):
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
            if out_of_time(f"training {preset} at {length} ({label})"):
                continue
            case_start = time.perf_counter()
            try:
                row = measure_pair(preset, length, mode, checkpoint, repeats)
            except Exception as err:  # a failing mode must not end the run: report it and go on
                row = {"megalodon": {"error": f"{type(err).__name__}: {str(err)[:200]}"}, "llama": {}}
            row.update(preset=preset, length=length, mode=label, seconds=time.perf_counter() - case_start)
            rows.append(row)
            log(train_row(row))
    log()
    return rows


def decode_rows(model, position: int, steps: int, modes: list[str]) -> list[dict]:
    """One result per mode, all from one prefill; where compiling fails, the eager rows still come (measured
    again) beside the error."""
    from megalodon.inference.benchmark import measure_decode_variants

    try:
        return measure_decode_variants(model, position, steps, [m == "compiled" for m in modes])
    except torch.cuda.OutOfMemoryError:
        return [{"error": "out of memory"}] * len(modes)
    except ValueError as err:  # e.g. a position beyond what the baseline's cache may hold
        return [{"error": str(err)[:120]}] * len(modes)
    except Exception as err:
        if "compiled" not in modes or modes == ["compiled"]:
            raise
        failed = {"error": f"{type(err).__name__}: {str(err)[:160]}"}
        eager = decode_rows(model, position, steps, ["eager"])[0]
        return [eager if m == "eager" else failed for m in modes]


def section_decode(preset: str, positions: list[int], steps: int, modes: list[str]) -> list[dict]:
    graph = "CUDA graph" if DEVICE == "cuda" else "no graph (CPU)"
    log(f"## Decode: {preset}, batch 1, bf16, greedy, after prefilling each position ({graph})\n")
    log("| model | position | step | decode tok/s | ms/token | prefill tok/s | state/cache MiB |\n"
        "|---|---|---|---|---|---|---|")
    rows = []
    for arch in ("megalodon", "llama"):
        model = build(arch, preset).to(torch.bfloat16).eval()
        for position in positions:
            if out_of_time(f"decode of {arch} at {position}"):
                continue
            results = decode_rows(model, position, steps, modes)
            for mode, result in zip(modes, results):
                result = {k: v for k, v in result.items() if k != "tokens"}
                result.update(model=arch, position=position, mode=mode)
                rows.append(result)
                if "error" in result:
                    log(f"| {arch} | {position:,} | {mode} | {result['error']} | | | |")
                else:
                    log(f"| {arch} | {position:,} | {mode} | {result['decode_tokens_per_s']:,.0f} | "
                        f"{result['ms_per_step']:.2f} | {result['prefill_tokens_per_s']:,.0f} | "
                        f"{result['state_bytes'] / 2**20:,.1f} |")
            free_cache()
        del model
        free_cache()
    log()
    return rows


def section_hf(preset: str, position: int, tokens: int, repeats: int) -> dict:
    import bench_hf  # beside this file

    log(f"## transformers generate(): {preset}, batch 1, bf16, greedy, {tokens} tokens after {position:,}\n")
    result = bench_hf.decode_rates(build("megalodon", preset).to(torch.bfloat16).eval(), position, tokens, repeats)
    log(bench_hf.table(result))
    return result


def profiled_step(arch: str, preset: str, length: int):
    """torch.profiler over one eager bf16 step (forward + backward) of a fresh model, after two warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    model = build(arch, preset)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=DEVICE)
    for _ in range(2):
        with autocast():
            loss_of(model, ids).backward()
    model.zero_grad(set_to_none=True)  # as a training step starts (no .grad to add into)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        with autocast():
            loss_of(model, ids).backward()
        sync()
    return prof


def section_profile(preset: str, length: int, out: Path | None) -> None:
    log(f"## Profile: one {preset} step at {length} tokens (eager, bf16 autocast)\n")
    launches, busy = {}, {}
    for arch in ("llama", "megalodon"):  # Megalodon's profile is the one kept and printed
        prof = profiled_step(arch, preset, length)
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        launches[arch] = sum(e.count for e in kernels)
        busy[arch] = sum(getattr(e, "self_device_time_total", 0.0) for e in kernels) / 1e3
    # benchmarks/op_counts.py predicts these on the CPU (per layer); here the whole step, embedding and loss too
    log(f"CUDA kernel launches in one step: Megalodon {launches['megalodon']:,}, "
        f"the Llama {launches['llama']:,}\n")
    # what a step replayed from CUDA graphs would cost, the host taken out: the ceiling of the graphed ratio
    ratio = f" (Llama / Megalodon: {busy['llama'] / busy['megalodon']:.2f})" if busy["megalodon"] else ""
    log(f"GPU busy in one step (the kernels' time): Megalodon {busy['megalodon']:.1f} ms, the Llama "
        f"{busy['llama']:.1f} ms{ratio}\n")
    sort = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
    log("```\n" + prof.key_averages().table(sort_by=sort, row_limit=30) + "\n```\n")
    if out is not None:
        # gzipped: the raw JSON can pass the 16 MB a file that the device tool brings back
        prof.export_chrome_trace(str(out / f"trace_{preset}_{length}.json.gz"))


# ---- main ------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections",
                        default="env,parity,train-graphed,train-eager,decode,profile,train-compiled,jax,"
                                "train-compiled-graphs,hf",
                        help="comma list of: env, parity, train (every --modes), train-eager, train-compiled, "
                             "train-graphed, train-compiled-graphs, decode, jax, profile, hf; they run in the order given")
    parser.add_argument("--presets", nargs="+", default=sorted({preset for preset, _ in TRAIN_CASES}))
    parser.add_argument("--lengths", nargs="+", type=int, default=None,
                        help="these lengths for every preset (default: %s)" % TRAIN_CASES)
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                        help="torch.compile or not, for the train and decode sections")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jax-lengths", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--decode-preset", default="mega200M")
    parser.add_argument("--decode-positions", nargs="+", type=int, default=[2048, 1 << 20])
    parser.add_argument("--decode-steps", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="write the results (and the profile trace) here")
    parser.add_argument("--results-name", default="results.json", help="the results file's name under --out")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke test of this script at tiny sizes (tests/test_bench_gpu.py runs it)")
    parser.add_argument("--strict", action="store_true", help="a failing section fails the run (for the smoke test)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after the start beyond which no new section or case starts")
    args = parser.parse_args()

    global DEVICE, DEADLINE
    DEVICE = args.device
    parity_preset, profile_case = "mega200M", ("mega200M", 4096)
    if DEVICE == "cpu":  # the smoke test: every code path at the tiny preset's sizes
        args.presets, args.lengths, parity_preset, profile_case = ["tiny"], [160], "tiny", ("tiny", 96)
        args.decode_preset, args.decode_positions, args.decode_steps = "tiny", [64, 300], 8
        args.repeats, args.jax_lengths = 1, [128]
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device; for CPU figures use benchmarks/bench_model.py "
                 "(--device cpu only smoke-tests this script)")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32; training runs in bf16 anyway
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]}
    started = time.perf_counter()
    if args.deadline is not None:
        DEADLINE = started + args.deadline
    runners = {
        "env": lambda: gpu_checks.environment(DEVICE),
        "parity": lambda: gpu_checks.parity(parity_preset, DEVICE),
        "train": lambda: section_train(args.presets, args.lengths, args.modes, args.repeats),
        "train-eager": lambda: section_train(args.presets, args.lengths, ["eager"], args.repeats),
        "train-compiled": lambda: section_train(args.presets, args.lengths, ["compiled"], args.repeats),
        "train-graphed": lambda: section_train(args.presets, args.lengths, ["graphed"], args.repeats),
        "train-compiled-graphs": lambda: section_train(args.presets, args.lengths, ["compiled-graphs"],
                                                       args.repeats),
        "jax": lambda: bench_jax.section(args.jax_lengths, args.repeats, out_of_time, DEADLINE),
        "decode": lambda: section_decode(args.decode_preset, args.decode_positions, args.decode_steps,
                                         args.modes),
        "profile": lambda: section_profile(*profile_case, args.out),
        "hf": lambda: section_hf(args.decode_preset, args.decode_positions[0], args.decode_steps, args.repeats),
    }
    unknown = [name for name in sections if name not in runners]
    if unknown:
        sys.exit(f"unknown section {unknown[0]!r}; choose from {', '.join(runners)}")
    for name in sections:
        if name in ("train-eager", "train-compiled", "train-compiled-graphs") and \
                name.removeprefix("train-").removesuffix("-graphs") not in args.modes:
            continue
        if out_of_time(f"section {name}"):
            continue
        section_start = time.perf_counter()
        try:
            results[name] = runners[name]()
        except Exception as err:  # one broken section must not cost the others on a rented GPU
            if args.strict:
                raise
            log(f"section {name} failed: {type(err).__name__}: {err}\n")
            results[name] = {"error": f"{type(err).__name__}: {err}"}
        log(f"({name}: {time.perf_counter() - section_start:.0f} s)\n")
        if args.out is not None:
            with contextlib.suppress(TypeError):
                (args.out / args.results_name).write_text(json.dumps(results, indent=2, default=str))
    log(f"total: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
