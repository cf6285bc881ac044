"""Decode tokens/s before and after the static decode path (issue 11), measured in one run on one machine.

    python benchmarks/bench_decode_history.py --before 85a59a2 --preset small --threads 1

Rows, batch 1, greedy, random weights, CPU:
- `before`: the per-token forward loop that generate() ran at commit --before (its tree extracted with
  `git archive`): Megalodon `model(token, state=s, return_state=True)` on a MegalodonState, the Llama
  `model(token, past=p, return_past=True)` on a KVCache that grows by concatenation;
- `now, forward loop`: the same loop on the current tree (what changed in forward() alone);
- `now, static` and `now, static compiled`: megalodon.inference.benchmark.measure_decode, the path generate()
  runs now (static buffers; on CUDA also a CUDA graph, not measured here).
Each measurement is a fresh process; the variants alternate within each repeat so that the machine's load falls
on all of them alike, and the median over repeats is printed. Past --llama-prefill-limit the Llama's cache is
filled with random values in both trees (a step's cost depends on the cache's length, not its contents).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("before", "now, forward loop", "now, static", "now, static compiled")


def forward_loop(arch: str, preset: str, position: int, steps: int, prefill_limit: int) -> float:
    """Tokens/s of the per-token forward loop; only calls that exist in both trees."""
    import time

    import torch

    from megalodon import Megalodon, MegalodonConfig
    from megalodon.baseline import Llama, matched_llama_config
    from megalodon.baseline.cache import KVCache

    torch.manual_seed(0)
    config = MegalodonConfig.from_preset(preset)
    model = (Megalodon(config) if arch == "megalodon" else Llama(matched_llama_config(config))).eval()
    vocab, generator = model.config.vocab_size, torch.Generator().manual_seed(0)
    with torch.no_grad():
        if arch == "megalodon":
            state, block = None, 16 * config.chunk_size
            for begin in range(0, position, block):
                ids = torch.randint(0, vocab, (1, min(block, position - begin)), generator=generator)
                _, state = model(ids, state=state, return_state=True, logits_to_keep=1)
            step = lambda token, s: model(token, state=s, return_state=True)  # noqa: E731
        else:
            if position <= prefill_limit:
                _, state = model(torch.randint(0, vocab, (1, position), generator=generator), return_past=True)
            else:
                cfg = model.config
                shape = (1, cfg.num_heads, position, cfg.model_dim // cfg.num_heads)
                state = KVCache([torch.randn(shape) for _ in range(cfg.num_layers)],
                                [torch.randn(shape) for _ in range(cfg.num_layers)],
                                torch.zeros(1, position, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                                position)
            step = lambda token, s: model(token, past=s, return_past=True)  # noqa: E731
        token = torch.zeros(1, 1, dtype=torch.int64)
        for _ in range(5):  # warm-up
            _, state = step(token, state)
        start = time.perf_counter()
        for _ in range(steps):
            logits, state = step(token, state)
            token = logits[:, -1:].argmax(-1)
        return steps / (time.perf_counter() - start)


def static_path(arch: str, preset: str, position: int, steps: int, prefill_limit: int, compile: bool) -> float:
    import torch

    from megalodon import Megalodon, MegalodonConfig
    from megalodon.baseline import Llama, matched_llama_config
    from megalodon.inference.benchmark import measure_decode

    torch.manual_seed(0)
    config = MegalodonConfig.from_preset(preset)
    model = Megalodon(config) if arch == "megalodon" else Llama(matched_llama_config(config))
    result = measure_decode(model.eval(), position, steps, compile=compile, llama_prefill_limit=prefill_limit)
    return result["decode_tokens_per_s"]


def _run(src: Path, threads: int, call: str) -> float:
    """`call` (a call of this module's functions) in a fresh interpreter with `src` first on the path."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import torch; "
            f"torch.set_flush_denormal(True); torch.set_num_threads({threads}); "
            f"import bench_decode_history as b; print(b.{call})")
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="85a59a2", help="the commit to measure as 'before'")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--positions", nargs="+", type=int, default=[2048, 1048576])
    parser.add_argument("--llama-positions", nargs="+", type=int, default=[2048, 131072])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--llama-prefill-limit", type=int, default=32768)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        trees = {"before": Path(tmp) / "src", "now": ROOT / "src"}
        print(f"preset {args.preset}, batch 1, CPU fp32, {args.threads} thread(s), {args.steps} steps, "
              f"median of {args.repeats}; before = {args.before}\n")
        print("| model | position | " + " | ".join(VARIANTS) + " |")
        print("|---|---|" + "---|" * len(VARIANTS))
        for arch, positions in (("megalodon", args.positions), ("llama", args.llama_positions)):
            for position in positions:
                common = f"{arch!r}, {args.preset!r}, {position}, {args.steps}, {args.llama_prefill_limit}"
                calls = {"before": ("before", f"forward_loop({common})"),
                         "now, forward loop": ("now", f"forward_loop({common})"),
                         "now, static": ("now", f"static_path({common}, False)"),
                         "now, static compiled": ("now", f"static_path({common}, True)")}
                rates = {name: [] for name in VARIANTS}
                for _ in range(args.repeats):
                    for name, (tree, call) in calls.items():
                        rates[name].append(_run(trees[tree], args.threads, call))
                cells = [f"{statistics.median(rates[name]):,.0f}" for name in VARIANTS]
                print(f"| {arch} | {position:,} | " + " | ".join(cells) + " |", flush=True)
                print(json.dumps({"arch": arch, "position": position, **rates}), file=sys.stderr)


if __name__ == "__main__":
    main()
