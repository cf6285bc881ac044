"""Chunk parallelism on CPU with gloo: what crosses ranks, per-rank memory, and step time.

    python benchmarks/bench_distributed.py                   # small preset, P = 1, 2, 4 at 8192 tokens
    python benchmarks/bench_distributed.py --preset tiny --total-length 2048 --bytes-lengths 512 1024 2048

Every configuration runs in freshly spawned processes (one per rank, one thread each), so that peak RSS is each
rank's own. The ranks form one chunk-parallel group over the whole sequence (batch 1, fp32, no data parallelism:
gradients are not reduced, which is FSDP's job and the same with or without chunk parallelism). Prints Markdown
tables.
"""

from __future__ import annotations

import argparse
import os
import queue
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Traffic:
    """Counts what this rank sends and receives in the chunk-parallel collectives, and the time spent in them."""

    def __init__(self):
        import megalodon.parallel.collectives as collectives

        self.calls, self.seconds, self.cpu_seconds = [], 0.0, 0.0
        gather, scatter = dist.all_gather, collectives._reduce_scatter

        def counted_gather(parts, tensor, group=None):
            start, cpu_start = time.perf_counter(), time.process_time()
            gather(parts, tensor, group=group)
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu_start
            self.calls.append(("gather", tensor.nbytes, sum(p.nbytes for p in parts) - tensor.nbytes))

        def counted_scatter(out, inp, group=None):
            start, cpu_start = time.perf_counter(), time.process_time()
            scatter(out, inp, group=group)
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu_start
            self.calls.append(("reduce-scatter", inp.nbytes - out.nbytes, inp.nbytes - out.nbytes))

        dist.all_gather = counted_gather  # the collectives module looks it up at call time
        collectives._reduce_scatter = counted_scatter

    def reset(self):
        self.calls, self.seconds, self.cpu_seconds = [], 0.0, 0.0


def _saved_activation_bytes(step) -> int:
    """Bytes of the distinct storages autograd saves for backward during one step: the activation memory."""
    storages = {}

    def pack(t):
        if t.device.type == "cpu" and t.numel():
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def _rank(rank: int, world: int, store: str, preset: str, length: int, threads: int, repeats: int, results):
    from megalodon import Megalodon, MegalodonConfig
    from megalodon.parallel import apply_chunk_parallel, local_segment

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = MegalodonConfig.from_preset(preset)
    model = Megalodon(config)
    group = dist.group.WORLD
    if world > 1:
        model = apply_chunk_parallel(model, group)
    ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    ids = local_segment(ids, group, config.chunk_size) if world > 1 else ids
    traffic = Traffic()

    def step():
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        model.zero_grad(set_to_none=True)

    rss_before = _rss_mb()
    step()  # warm-up, and the traffic of one step
    calls = list(traffic.calls)
    activations = _saved_activation_bytes(step)
    times, cpu_times = [], []
    for _ in range(repeats):
        dist.barrier()
        traffic.reset()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start - traffic.cpu_seconds)  # gloo may spin while waiting
    results.put({"rank": rank, "calls": calls, "activation_mb": activations / 2 ** 20,
                 "peak_growth_mb": _peak_rss_mb() - rss_before, "step_s": statistics.median(times),
                 "cpu_s": statistics.median(cpu_times),
                 "comm_s": traffic.seconds, "layers": config.num_layers})
    dist.barrier()


def run(preset: str, length: int, world: int, threads: int, repeats: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, world, os.path.join(tmp, "store"), preset, length, threads,
                                                 repeats, results)) for r in range(world)]
        for p in procs:
            p.start()
        out = []
        while len(out) < world:  # a rank that dies sends nothing: watch the processes, not only the queue
            try:
                out.append(results.get(timeout=1.0))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    for p in procs:
                        p.kill()
                    raise RuntimeError("a rank failed (its traceback is above)")
        for p in procs:
            p.join()
    return sorted(out, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--total-length", type=int, default=8192, help="tokens per sequence, split over P ranks")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--bytes-lengths", nargs="+", type=int, default=[2048, 4096, 8192, 16384],
                        help="total lengths for the traffic table (at P = 2)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"torch {torch.__version__}, gloo, {cores} cores, preset {args.preset}, fp32, batch 1\n")

    print("## What crosses ranks per step, P = 2 (rank 0; every rank sends and receives the same amounts)\n")
    print("| total length | gathers per step | summary bytes per layer (norm + CEMA) | final norm | "
          "received per layer, forward | sent back per layer, backward | per step, all layers |")
    print("|---|---|---|---|---|---|---|")
    for length in args.bytes_lengths:
        rank0 = run(args.preset, length, 2, 1, 1)[0]
        gathers = [c for c in rank0["calls"] if c[0] == "gather"]
        layers = rank0["layers"]
        per_layer = sum(c[1] for c in gathers[:2])
        received = sum(c[2] for c in gathers[:2])
        backward = sum(c[1] for c in rank0["calls"] if c[0] == "reduce-scatter") - gathers[-1][1]
        total = sum(c[1] + c[2] for c in rank0["calls"])
        print(f"| {length:,} | {len(gathers)} | {per_layer:,} | {gathers[-1][1]:,} | {received:,} | "
              f"{backward // layers:,} | {total:,} |", flush=True)

    print(f"\n## Per-rank memory and step time at {args.total_length:,} tokens in total\n")
    print("| P | tokens per rank | saved activations per rank (MB) | peak RSS growth per rank (MB) | "
          "CPU time per rank, outside collectives (s) | step time (s) | of which in collectives (s) | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for world in args.ranks:
        ranks = run(args.preset, args.total_length, world, 1, args.repeats)
        step = max(r["step_s"] for r in ranks)
        print(f"| {world} | {args.total_length // world:,} | "
              f"{statistics.mean(r['activation_mb'] for r in ranks):,.0f} | "
              f"{statistics.mean(r['peak_growth_mb'] for r in ranks):,.0f} | "
              f"{statistics.mean(r['cpu_s'] for r in ranks):.2f} | {step:.2f} | "
              f"{max(r['comm_s'] for r in ranks):.3f} | {args.total_length / step:,.0f} |", flush=True)
    print("\nOne thread per rank (two OpenMP threads per process on a shared, loaded machine ran 8x slower). CPU time"
          " is the work each rank does; step time is wall clock, including waits for the slowest rank and for other"
          " processes on the machine.")
    if max(args.ranks) > cores:
        print(f"P > {cores} runs more processes than cores: its step time measures oversubscription, not scaling.")


if __name__ == "__main__":
    sys.exit(main())
