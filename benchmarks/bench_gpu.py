"""GPU speed and memory: Megalodon against the matched Llama on one CUDA device, in one run (issue 11's table).

    python benchmarks/bench_gpu.py                       # everything (gpu_session.sh runs it in two parts)
    python benchmarks/bench_gpu.py --sections train --presets mega200M --lengths 4096
    python benchmarks/bench_gpu.py --out results/        # also write results.json and a profile there

Sections (by default in the order env, train-graphed, train-eager, decode, train-compiled-graphed, jax, profile,
train-compiled, parity, train-compiled-graphs, hf: most wanted first, so that a run cut short still has the main
figures):
- env:    the device, torch/triton/CUDA versions, which Triton kernels are on;
- train-graphed, train-eager, train-compiled-graphed, train-compiled and train-compiled-graphs (or train, for
          every --modes): forward + backward (no optimizer), batch 1, bf16 autocast over fp32 master weights, both
          models alternating step by step; tokens/s, the ratio, activation memory (gpu_training.py says what each
          mode is);
- decode: tokens/s at batch 1 after prefilling 2K and 1M tokens, both models (the Llama up to its KV memory),
          each from one prefill: the step replayed from a CUDA graph, eager and compiled (--modes), over one
          whole chunk of steps (2,048 at mega200M: every in-chunk position once, not only a chunk's cheap start);
- jax:    megalodon-jax at the mega200M shape with bf16 compute, when it is installed (a separate process: JAX
          and PyTorch must not share the GPU's memory pools);
- profile: one mega200M 4K step of each model under torch.profiler, eager and with compiled blocks (--modes): GPU
          time and launches by kind of kernel (GEMMs, CEMA, TimestepNorm, attention, Inductor's fused kernels,
          copies...; the compiled step as a graphed one runs it), Megalodon's kernels one by one (eager and
          compiled), and its eager trace under --out; then a decode step of each
          model the same way (per step, from the middle of a chunk): what a graph-replayed step's kernels cost the
          GPU;
- parity: the CUDA model (Triton kernels, fp32) against the CPU fp32 model: logits and gradients; bf16 autocast
          against fp32; split invariance on CUDA (the GPU tests check the kernels and the model first);
- hf:     transformers' generate() against the core's static decode, Megalodon at the first decode position
          (bench_hf.py).

--deadline SECONDS skips what would start after that many seconds (each skip is logged), so that a run under an
outer time limit ends on its own with its results written.

Activation memory is the peak allocated during a step minus what was allocated before it (weights and
gradients included in the baseline), so it counts activations and temporaries only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

PROCESS_START = time.perf_counter()  # --deadline counts from here: importing torch below takes seconds of it

import bench_jax  # noqa: E402  (beside this file)
import gpu_checks  # noqa: E402
import gpu_tuning  # noqa: E402
import gpu_training as training  # noqa: E402
import op_timing  # noqa: E402
import torch  # noqa: E402
from gpu_checks import log  # noqa: E402
from gpu_training import TRAIN_CASES, autocast, build, free_cache, loss_of, section_train, sync  # noqa: E402

from megalodon.ops.attention import launches_without_host_cost  # noqa: E402

DEADLINE = float("inf")  # time.perf_counter() after which nothing new starts (--deadline)
STRICT = False  # --strict: a failure anywhere fails the run (the CPU smoke test)
LLAMA_FULL_STEPS_UP_TO = 32768  # decode positions beyond this time the Llama over at most 256 steps


def out_of_time(what: str) -> bool:
    if time.perf_counter() < DEADLINE:
        return False
    log(f"(skipped {what}: past --deadline)")
    return True


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


def section_decode(preset: str, positions: list[int], steps: int, modes: list[str],
                   keep: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """The decode table's rows, keep(rows) after each position (as section_train). A position that fails gets its
    error in its rows, and the next one is still tried."""
    graph = "CUDA graph" if training.DEVICE == "cuda" else "no graph (CPU)"
    log(f"## Decode: {preset}, batch 1, bf16, greedy, timed steps after prefilling each position ({graph})\n")
    log("| model | position | step | timed steps | decode tok/s | ms/token | prefill tok/s | state/cache MiB |\n"
        "|---|---|---|---|---|---|---|---|")
    rows = []
    for arch in ("megalodon", "llama"):
        model = build(arch, preset).to(torch.bfloat16).eval()
        for position in positions:
            if out_of_time(f"decode of {arch} at {position}"):
                continue
            # the Llama's step reads its whole cache: a chunk of steps more changes it by under 1% from 32K on,
            # where 2,048 steps at 1M would take about a minute a mode
            timed = steps if arch == "megalodon" or position <= LLAMA_FULL_STEPS_UP_TO else min(steps, 256)
            try:
                results = decode_rows(model, position, timed, modes)
            except Exception as err:  # the positions measured before it keep their rows
                if STRICT:
                    raise
                results = [{"error": f"{type(err).__name__}: {str(err)[:160]}"}] * len(modes)
            for mode, result in zip(modes, results):
                result = {k: v for k, v in result.items() if k != "tokens"}
                result.update(model=arch, preset=preset, position=position, mode=mode)
                rows.append(result)
                if "error" in result:
                    log(f"| {arch} | {position:,} | {mode} | {timed:,} | {result['error']} | | | |")
                else:
                    log(f"| {arch} | {position:,} | {mode} | {timed:,} | {result['decode_tokens_per_s']:,.0f} | "
                        f"{result['ms_per_step']:.2f} | {result['prefill_tokens_per_s']:,.0f} | "
                        f"{result['state_bytes'] / 2**20:,.1f} |")
            keep(rows)
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


def profiled_step(arch: str, preset: str, length: int, compiled: bool = False):
    """torch.profiler over one bf16 step (forward + backward) of a fresh model, after two warm-up steps; compiled:
    its blocks through torch.compile first (the trainer's --compile), compiled during the warm-up, and the step as
    a graphed one runs it (the attention's queries in blocks, launches_without_host_cost): the kernels that the
    best rows (compiled-graphed) replay, whose profile a graph replay itself does not show one by one."""
    model = build(arch, preset)
    if compiled:
        model.compile_blocks()
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=training.DEVICE)

    def step() -> None:
        with autocast(), launches_without_host_cost() if compiled else contextlib.nullcontext():
            loss_of(model, ids).backward()

    for _ in range(2):
        step()
    model.zero_grad(set_to_none=True)  # as a training step starts (no .grad to add into)
    return profiled(step)


def profiled(run):
    """torch.profiler over run(), the device's queue drained before and after (CUDA kernels where there are)."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if training.DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        sync()
    return prof


def kernel_listing(prof, rows: int) -> str:
    """The profile's ops one by one, the costliest first (by GPU time on CUDA), as a Markdown code block."""
    sort = "cuda_time_total" if training.DEVICE == "cuda" else "cpu_time_total"
    return "```\n" + prof.key_averages().table(sort_by=sort, row_limit=rows) + "\n```\n"


def kind_table(runs: dict[str, dict[str, tuple[int, float]]], per: int = 1) -> None:
    """Columns of op_timing.kernels_by_kind results side by side (divided by `per`: a step's share of several),
    each column's GPU-busy total last."""
    log("| kernels | " + " | ".join(runs) + " |")
    log("|---|" + "---|" * len(runs))
    for kind in [kind for kind, _, _ in op_timing.KERNEL_KINDS] + ["other"]:
        cells = [runs[column].get(kind) for column in runs]
        if any(cells):
            log(f"| {kind} | " + " | ".join(f"{ms / per:.3f} ({n / per:,.0f})" if (n, ms) != (0, 0.0) else "-"
                                           for n, ms in (c or (0, 0.0) for c in cells)) + " |")
    totals = [(sum(n for n, _ in kinds.values()), sum(ms for _, ms in kinds.values())) for kinds in runs.values()]
    log("| **GPU busy** | " + " | ".join(f"**{ms / per:.3f}** ({n / per:,.0f})" for n, ms in totals) + " |\n")


def section_profile(preset: str, length: int, out: Path | None, decode_steps: int = 32,
                    compiled: bool = True) -> dict:
    """The eager step of both models, kernel by kernel (Megalodon's table and trace), then both models' kernels
    by kind, eager and (compiled) with compiled blocks: where Megalodon's GPU time goes against the Llama's. A
    graphed step replays the same kernels, so their sum is the GPU time a step costs once the host is out of it.
    Then the same for a decode step (profile_decode)."""
    log(f"## Profile: one {preset} step at {length} tokens (bf16 autocast)\n")
    runs, listings = {}, {}
    for mode in ("eager", "compiled") if compiled else ("eager",):
        for arch in ("llama", "megalodon"):
            if mode == "compiled" and out_of_time(f"the compiled profile of {arch}"):
                continue
            try:
                prof = profiled_step(arch, preset, length, compiled=mode == "compiled")
            except Exception as err:  # the eager profile and the other model's still count
                log(f"(profile of {arch} {mode} failed: {type(err).__name__}: {str(err)[:160]})\n")
                continue
            runs[arch, mode] = op_timing.kernels_by_kind(prof)
            if arch == "megalodon":
                listings[mode] = kernel_listing(prof, 30)
            if (arch, mode) == ("megalodon", "eager"):
                if out is not None:
                    # now: exported after later profiles had run (H200, 2026-11-30), its kernels had no times;
                    # gzipped, as the raw JSON can pass the 16 MB a file that the device tool brings back
                    prof.export_chrome_trace(str(out / f"trace_{preset}_{length}.json.gz"))
            free_cache()
    columns = [key for key in (("megalodon", "eager"), ("llama", "eager"), ("megalodon", "compiled"),
                               ("llama", "compiled")) if key in runs]
    if ("megalodon", "eager") in runs and ("llama", "eager") in runs:
        # benchmarks/op_counts.py predicts the launches on the CPU (per layer); here the whole step
        launches = {arch: sum(n for n, _ in runs[arch, "eager"].values()) for arch in ("megalodon", "llama")}
        log(f"CUDA kernel launches in one eager step: Megalodon {launches['megalodon']:,}, the Llama "
            f"{launches['llama']:,}\n")
    log("GPU time by kind of kernel, ms (launches): the kernels' own time, the host's gaps left out\n")
    kind_table({f"{'Megalodon' if arch == 'megalodon' else 'Llama'} {mode}": runs[arch, mode]
                for arch, mode in columns})
    for mode, listing in listings.items():
        log(f"Megalodon {mode}, kernel by kernel{' (as a graphed step runs it)' if mode == 'compiled' else ''}:\n")
        log(listing)
    result = {f"{arch} {mode}": {kind: {"launches": n, "ms": ms} for kind, (n, ms) in runs[arch, mode].items()}
              for arch, mode in columns}
    if not out_of_time("the decode profile"):
        result["decode"] = profile_decode(preset, decode_steps)
    return result


@torch.no_grad()
def profiled_decode(arch: str, preset: str, position: int, steps: int):
    """torch.profiler over `steps` eager decode steps (bf16, batch 1, greedy) after prefilling `position` tokens.
    Eager, each kernel is its own launch; a CUDA graph replays the same kernels, so their time is the floor of a
    replayed step, and the decode table's ms/token minus it is what the replay loses between kernels."""
    from megalodon.inference.benchmark import prefill_for_decode
    from megalodon.inference.decoding import StaticDecoder

    model = build(arch, preset).to(torch.bfloat16).eval()
    logits, state, _ = prefill_for_decode(model, position, steps + 3)
    decoder = StaticDecoder(model, state, cuda_graph=False)
    tokens = [logits.argmax(-1)]

    def decode(count: int) -> None:
        for _ in range(count):
            tokens[0] = decoder.step(tokens[0]).argmax(-1)

    decode(3)
    return profiled(lambda: decode(steps))


def profile_decode(preset: str, steps: int) -> dict:
    """Both models' decode step by kind of kernel, per step, from the middle of a chunk (the step attends to half
    a chunk of Megalodon's values; the Llama to its whole cache, as long), and Megalodon's kernels one by one."""
    from megalodon import MegalodonConfig

    position = MegalodonConfig.from_preset(preset).chunk_size * 3 // 2
    log(f"### Decode: {steps} eager steps after {position:,} tokens, GPU time per step by kind of kernel, ms "
        "(launches)\n")
    runs, kept = {}, None
    for arch in ("megalodon", "llama"):
        try:
            prof = profiled_decode(arch, preset, position, steps)
        except Exception as err:
            log(f"(decode profile of {arch} failed: {type(err).__name__}: {str(err)[:160]})\n")
            continue
        runs["Megalodon" if arch == "megalodon" else "Llama"] = op_timing.kernels_by_kind(prof)
        kept = prof if arch == "megalodon" else kept
        free_cache()
    kind_table(runs, per=steps)
    if kept is not None:
        log(f"Megalodon's decode, kernel by kernel ({steps} steps):\n")
        log(kernel_listing(kept, 25))
    return {"position": position, "steps": steps, **{
        column: {kind: {"launches": n / steps, "ms": ms / steps} for kind, (n, ms) in kinds.items()}
        for column, kinds in runs.items()}}


# ---- main ------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections",
                        default="env,train-graphed,train-eager,decode,train-compiled-graphed,jax,profile,"
                                "train-compiled,parity,train-compiled-graphs,hf",
                        help="comma list of: env, parity, train (every --modes), train-eager, train-compiled, "
                             "train-graphed, train-compiled-graphed, train-compiled-graphs, decode, jax, profile, hf; "
                             "they run in the order given")
    parser.add_argument("--presets", nargs="+", default=sorted({preset for preset, _ in TRAIN_CASES}))
    parser.add_argument("--lengths", nargs="+", type=int, default=None,
                        help="these lengths for every preset (default: %s)" % TRAIN_CASES)
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                        help="torch.compile or not, for the train and decode sections")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jax-lengths", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--decode-preset", default="mega200M")
    parser.add_argument("--decode-positions", nargs="+", type=int, default=[2048, 1 << 20])
    parser.add_argument("--decode-steps", type=int, default=None,
                        help="timed decode steps from each position (default: one chunk of the decode preset, so "
                             "that every in-chunk position is timed once: a step reads the values of its chunk so "
                             "far, and the first steps of a chunk are the cheapest)")
    parser.add_argument("--hf-tokens", type=int, default=256, help="tokens each generate() call makes (hf)")
    parser.add_argument("--out", type=Path, default=None, help="write the results (and the profile trace) here")
    parser.add_argument("--results-name", default="results.json", help="the results file's name under --out")
    parser.add_argument("--append", action="store_true",
                        help="add this run's sections to an existing results file rather than replacing it "
                             "(gpu_session.sh runs a part in several processes)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke test of this script at tiny sizes (tests/test_bench_gpu.py runs it)")
    parser.add_argument("--strict", action="store_true", help="a failing section fails the run (for the smoke test)")
    parser.add_argument("--kernel-settings", type=Path, default=None,
                        help="a settings file from gpu_tuning.py: the kernels' tilings and the kernels to turn off, "
                             "applied before any section (gpu_session.sh tuned)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after the process started beyond which no new section or case starts")
    args = parser.parse_args()

    global DEADLINE, STRICT
    DEVICE, STRICT = args.device, args.strict
    training.use_device(DEVICE)
    parity_preset, profile_case = "mega200M", ("mega200M", 4096, 32)  # preset, training length, decode steps
    if DEVICE == "cpu":  # the smoke test: every code path at the tiny preset's sizes
        args.presets, args.lengths, parity_preset, profile_case = ["tiny"], [160], "tiny", ("tiny", 96, 4)
        args.decode_preset, args.decode_positions, args.decode_steps, args.hf_tokens = "tiny", [64, 300], 8, 8
        args.repeats, args.jax_lengths = 1, [128]
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device; for CPU figures use benchmarks/bench_model.py "
                 "(--device cpu only smoke-tests this script)")
    if args.decode_steps is None:
        from megalodon import MegalodonConfig

        args.decode_steps = MegalodonConfig.from_preset(args.decode_preset).chunk_size
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32; training runs in bf16 anyway
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]}
    if args.append and args.out is not None and (args.out / args.results_name).is_file():
        earlier = json.loads((args.out / args.results_name).read_text())
        results = {**earlier, "appended": [*earlier.get("appended", []), sys.argv[1:]]}
    if args.kernel_settings is not None:
        results["kernel_settings"] = gpu_tuning.apply_settings(args.kernel_settings)
        log(f"Kernel settings from {args.kernel_settings} (gpu_tuning.py): {json.dumps(results['kernel_settings'])}\n")
    started = time.perf_counter()
    if args.deadline is not None:
        DEADLINE = PROCESS_START + args.deadline

    def save() -> None:
        if args.out is not None:
            with contextlib.suppress(TypeError):
                (args.out / args.results_name).write_text(json.dumps(results, indent=2, default=str))

    def keep(name: str) -> Callable[[list[dict]], None]:
        """A section's rows so far, written at once: a timeout from outside then costs only the row it cut."""
        def write(rows: list[dict]) -> None:
            results[name] = rows
            save()
        return write

    def train(modes: list[str], name: str):
        return lambda: section_train(args.presets, args.lengths, modes, args.repeats, out_of_time, keep(name))

    runners = {
        "env": lambda: gpu_checks.environment(DEVICE),
        "parity": lambda: gpu_checks.parity(parity_preset, DEVICE),
        "train": train(args.modes, "train"),
        **{f"train-{mode}": train([mode], f"train-{mode}")
           for mode in ("eager", "compiled", "graphed", "compiled-graphs", "compiled-graphed")},
        "jax": lambda: bench_jax.section(args.jax_lengths, args.repeats, out_of_time, DEADLINE),
        "decode": lambda: section_decode(args.decode_preset, args.decode_positions, args.decode_steps,
                                         args.modes, keep("decode")),
        "profile": lambda: section_profile(*profile_case[:2], args.out, profile_case[2], "compiled" in args.modes),
        "hf": lambda: section_hf(args.decode_preset, args.decode_positions[0], args.hf_tokens, args.repeats),
    }
    unknown = [name for name in sections if name not in runners]
    if unknown:
        sys.exit(f"unknown section {unknown[0]!r}; choose from {', '.join(runners)}")
    for name in sections:
        if name in ("train-eager", "train-compiled", "train-compiled-graphs", "train-compiled-graphed") and \
                name.removeprefix("train-").removesuffix("-graphs").removesuffix("-graphed") not in args.modes:
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
        save()
    log(f"total: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
