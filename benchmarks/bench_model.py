"""Model speed and memory on this machine: Megalodon against the matched Llama, in the same run.

    python benchmarks/bench_model.py                      # small and base, L = 1K, 4K, 16K; decode at 1K and 64K
    python benchmarks/bench_model.py --presets small --lengths 1024 --decode-positions 1024
    python benchmarks/bench_model.py --train --batch 8 --lengths 1024 --dtype fp32 bf16 --repeats 7

Each measurement runs in a fresh subprocess so that its peak RSS is its own. Prints Markdown tables.
--train measures instead what the trainer runs per optimizer step (forward with the carried state, backward,
gradient clipping, AdamW) for both models in one process, alternating step by step, and prints the median.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(arch: str, preset: str):
    from megalodon import Megalodon, MegalodonConfig
    from megalodon.baseline import Llama, matched_llama_config

    config = MegalodonConfig.from_preset(preset)
    torch.manual_seed(0)
    return Megalodon(config) if arch == "megalodon" else Llama(matched_llama_config(config))


def measure_train_step(arch: str, preset: str, length: int, repeats: int) -> dict:
    """Forward + backward of one sequence of `length` tokens (batch 1), fp32."""
    model = _build(arch, preset)
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    before = peak_rss_mb()

    def step() -> None:
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    seconds = (time.perf_counter() - start) / repeats
    return {"tokens_per_s": length / seconds, "peak_mb": peak_rss_mb(), "activation_mb": peak_rss_mb() - before}


def train_steps(preset: str, batch: int, length: int, dtype: str, repeats: int, compile: bool = False) -> dict:
    """Tokens/s of both models' optimizer steps, as the trainer runs them (compile: torch.compile each block, as
    --compile true does), alternating step by step so that the machine's load falls on both alike."""
    import math
    import statistics

    from megalodon.data import Batch
    from megalodon.training.compute import forward_loss
    from megalodon.training.config import TrainConfig
    from megalodon.training.optim import build_optimizer

    cfg = TrainConfig(max_steps=1)  # only the optimizer settings are read
    from megalodon import MegalodonConfig

    vocab = MegalodonConfig.from_preset(preset).vocab_size
    ids = torch.randint(0, vocab, (batch, length + 1), generator=torch.Generator().manual_seed(0))
    data = Batch(ids[:, :-1], ids[:, 1:], torch.zeros(batch, length, dtype=torch.bool),
                 torch.zeros(batch, dtype=torch.bool))
    runs = {}
    for arch in ("megalodon", "llama"):
        model = _build(arch, preset).train()
        runs[arch] = {"model": model.compile_blocks() if compile else model, "optimizer": build_optimizer(model, cfg),
                      "state": None, "wall": [], "cpu": []}

    def step(run: dict, stateful: bool) -> tuple[float, float]:
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss, state = forward_loss(run["model"], data, run["state"], stateful)
        (loss / data.labels.numel()).backward()
        torch.nn.utils.clip_grad_norm_(run["model"].parameters(), math.inf)
        run["optimizer"].step()
        run["optimizer"].zero_grad(set_to_none=True)
        run["state"] = state.detach() if stateful else None
        return time.perf_counter() - start, time.process_time() - start_cpu

    warmup = 3 if compile else 1  # rounds; compiled, they also take the recompiles for the carried state
    for r in range(warmup + repeats):
        for arch, run in runs.items():
            wall, cpu = step(run, arch == "megalodon")
            if r >= warmup:
                run["wall"].append(wall)
                run["cpu"].append(cpu)
    return {arch: {clock: batch * length / statistics.median(run[clock]) for clock in ("wall", "cpu")}
            for arch, run in runs.items()}


@torch.no_grad()
def measure_decode(preset: str, position: int, steps: int) -> dict:
    """Megalodon: prefill `position` tokens (vectorized, chunk-sized blocks), then decode `steps` tokens."""
    model = _build("megalodon", preset).eval()
    vocab, chunk = model.config.vocab_size, model.config.chunk_size
    generator = torch.Generator().manual_seed(0)
    state, block = None, 16 * chunk
    start = time.perf_counter()
    for offset in range(0, position, block):
        ids = torch.randint(0, vocab, (1, min(block, position - offset)), generator=generator)
        _, state = model(ids, state=state, return_state=True)
    prefill = time.perf_counter() - start
    state_bytes = state.nbytes
    token = torch.zeros(1, 1, dtype=torch.long)
    for _ in range(5):  # warm-up; the chunk fill stays far from a boundary only if positions are chunk-aligned
        _, state = model(token, state=state, return_state=True)
    start = time.perf_counter()
    for _ in range(steps):
        logits, state = model(token, state=state, return_state=True)
        token = logits[:, -1:].argmax(-1)
    seconds = time.perf_counter() - start
    return {"decode_tokens_per_s": steps / seconds, "prefill_tokens_per_s": position / prefill,
            "state_bytes": state_bytes, "peak_mb": peak_rss_mb()}


def llama_kv_bytes(preset: str, position: int) -> int:
    """Keys and values the baseline must hold at `position` with full attention (fp32)."""
    from megalodon import MegalodonConfig
    from megalodon.baseline import matched_llama_config

    cfg = matched_llama_config(MegalodonConfig.from_preset(preset))
    return 2 * cfg.num_layers * position * cfg.model_dim * 4


def in_subprocess(module: str, kind: str, **kwargs):
    """Run benchmarks/<module>.py's function `kind` in a fresh interpreter, so that its peak RSS is its own."""
    code = (f"import json, sys; sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r}); import {module} as b; "
            f"import torch; torch.set_flush_denormal(True); print(json.dumps(b.{kind}(**{kwargs!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _in_subprocess(kind: str, **kwargs) -> dict:
    return in_subprocess("bench_model", kind, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "base"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--decode-positions", nargs="+", type=int, default=[1024, 65536])
    parser.add_argument("--decode-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train", action="store_true", help="optimizer steps of both models, alternating")
    parser.add_argument("--batch", type=int, default=8, help="rows per step (--train)")
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32"], help="(--train)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each block of both models, as the trainer's --compile does (--train)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.train:
        return print_train_steps(args)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32\n")
    print("## Forward + backward, batch 1\n")
    print("| preset | L | Megalodon tok/s | Llama tok/s | ratio | Megalodon act. MB | Llama act. MB |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        for length in args.lengths:
            mega = _in_subprocess("measure_train_step", arch="megalodon", preset=preset, length=length,
                                  repeats=args.repeats)
            llama = _in_subprocess("measure_train_step", arch="llama", preset=preset, length=length,
                                   repeats=args.repeats)
            print(f"| {preset} | {length} | {mega['tokens_per_s']:,.0f} | {llama['tokens_per_s']:,.0f} | "
                  f"{mega['tokens_per_s'] / llama['tokens_per_s']:.2f} | {mega['activation_mb']:,.0f} | "
                  f"{llama['activation_mb']:,.0f} |", flush=True)

    print("\n## Streaming decode (Megalodon), batch 1\n")
    print("| preset | position | decode tok/s | prefill tok/s | state bytes | Llama KV bytes (full attention) |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        rates = []
        for position in args.decode_positions:
            result = _in_subprocess("measure_decode", preset=preset, position=position, steps=args.decode_steps)
            rates.append(result["decode_tokens_per_s"])
            print(f"| {preset} | {position:,} | {result['decode_tokens_per_s']:,.1f} | "
                  f"{result['prefill_tokens_per_s']:,.0f} | {result['state_bytes']:,} | "
                  f"{llama_kv_bytes(preset, position):,} |", flush=True)
        print(f"\n{preset}: decode speed at the first position / at the last = {rates[0] / rates[-1]:.2f}\n")


def print_train_steps(args) -> None:
    amx = "amx_bf16" in open("/proc/cpuinfo").read()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, AMX {'yes' if amx else 'no'}, "
          f"batch {args.batch}, median of {args.repeats} optimizer steps per model, alternating"
          f"{', compiled' if args.compile else ''}\n")
    # Per CPU second too: on a machine shared with other jobs, the process's CPU time (at one thread) tracks the
    # work done far more steadily than the wall clock, which counts the time other jobs hold the cores.
    print("| preset | batch x L | dtype | Megalodon tok/s | Llama tok/s | ratio | Megalodon tok/CPU-s | "
          "Llama tok/CPU-s | ratio (CPU time) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        for length in args.lengths:
            for dtype in args.dtype:
                rates = train_steps(preset, args.batch, length, dtype, args.repeats, args.compile)
                mega, llama = rates["megalodon"], rates["llama"]
                print(f"| {preset} | {args.batch} x {length} | {dtype} | {mega['wall']:,.0f} | {llama['wall']:,.0f} | "
                      f"{mega['wall'] / llama['wall']:.2f} | {mega['cpu']:,.0f} | {llama['cpu']:,.0f} | "
                      f"{mega['cpu'] / llama['cpu']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
