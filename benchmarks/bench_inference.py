"""Inference at long context: decode speed and state size by position, prefill speed, streaming perplexity.

    python benchmarks/bench_inference.py                       # small preset, random weights, CPU
    python benchmarks/bench_inference.py --sections decode --preset mega200M --device cuda --dtype bfloat16 \
        --positions 2048 1048576                               # issue 11's decode figures
    python benchmarks/bench_inference.py --model-dir runs/demo/model --stream-lengths 125000 1000000

Decode: both models the way generate() runs them (static buffers, a CUDA graph on CUDA, greedy tokens fed back
on the device; megalodon.inference.benchmark.measure_decode), batch 1, after prefilling each position. Megalodon's
state does not grow with the stream, so its speed should be flat in position; the matched Llama's KV cache (full
attention) grows linearly. Past --llama-prefill-limit the Llama's cache is filled with random values instead of a
dense prefill (its step costs the same). Each measurement is a fresh subprocess, so its peak RSS is its own.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_model import in_subprocess, peak_rss_mb  # noqa: E402

from megalodon.inference.stream import default_block_tokens  # noqa: E402

SECTIONS = ("decode", "prefill", "stream")


def _load(model_dir: str | None, preset: str):
    from megalodon import Megalodon, MegalodonConfig
    from megalodon.checkpoint import load_pretrained

    torch.manual_seed(0)
    model = load_pretrained(model_dir) if model_dir else Megalodon(MegalodonConfig.from_preset(preset))
    return model.eval()


def decode_rate(arch: str, model_dir: str | None, preset: str, position: int, steps: int, device: str,
                dtype: str, compile: bool, llama_prefill_limit: int, threads: int | None) -> dict:
    """One model's decode speed after prefilling `position` tokens (measure_decode)."""
    from megalodon.baseline import Llama, matched_llama_config
    from megalodon.inference.benchmark import measure_decode

    if threads:
        torch.set_num_threads(threads)

    if arch == "megalodon":
        model = _load(model_dir, preset)
    else:
        torch.manual_seed(0)
        model = Llama(matched_llama_config(_load(model_dir, preset).config)).eval()
    model = model.to(device=device, dtype=getattr(torch, dtype))
    result = measure_decode(model, position, steps, compile=compile, llama_prefill_limit=llama_prefill_limit)
    return {**result, "peak_rss_mb": peak_rss_mb()}


@torch.no_grad()
def prefill_rate(model_dir: str | None, preset: str, length: int) -> dict:
    """Prefill `length` tokens (no logits but the last) against the training forward pass per token."""
    from megalodon.inference.stream import final_logits_and_state

    model = _load(model_dir, preset)
    ids = torch.randint(0, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(0))
    final_logits_and_state(model, ids[:2048], block_tokens=default_block_tokens(model.config.chunk_size))  # warm-up
    start = time.perf_counter()
    final_logits_and_state(model, ids, block_tokens=default_block_tokens(model.config.chunk_size))
    prefill = length / (time.perf_counter() - start)
    train_ids = torch.randint(0, model.config.vocab_size, (8, 1024), generator=torch.Generator().manual_seed(1))
    with torch.enable_grad():
        model(train_ids)
        start = time.perf_counter()
        model(train_ids)
        forward = train_ids.numel() / (time.perf_counter() - start)
    return {"prefill_tokens_per_s": prefill, "train_forward_tokens_per_s": forward}


def stream_perplexity(model_dir: str | None, preset: str, length: int) -> dict:
    """Perplexity over one `length`-token stream (a book repeated), with the model's constant-memory state."""
    from megalodon.data import ByteTokenizer, load_corpus, load_tokenizer
    from megalodon.inference.evaluate import EvalDocument, evaluate

    model = _load(model_dir, preset)
    tokenizer = load_tokenizer(model_dir) if model_dir else ByteTokenizer()
    text = "\n".join(load_corpus("shakespeare", "data/corpora")[:6])
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64) % model.config.vocab_size
    ids = ids.repeat(length // len(ids) + 1)[:length]
    n_bytes = round(len(text.encode()) * length / len(tokenizer.encode(text)))
    before = peak_rss_mb()
    start = time.perf_counter()
    block = default_block_tokens(model.config.chunk_size)
    result = evaluate(model, [EvalDocument(ids, n_bytes, "stream")], block_size=block)
    return {"length": length, "seconds": time.perf_counter() - start, "perplexity": result.perplexity,
            "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before}


def _in_subprocess(kind: str, **kwargs):
    return in_subprocess("bench_inference", kind, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--model-dir", help="a trained model directory (default: random weights of --preset)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--positions", nargs="+", type=int, default=[2048, 131072, 1048576])
    parser.add_argument("--decode-steps", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--threads", type=int, help="CPU threads for decode (default: torch's)")
    parser.add_argument("--llama-prefill-limit", type=int, default=32768)
    parser.add_argument("--llama-max-position", type=int, default=None,
                        help="skip the Llama beyond this position (default: 131072 on the CPU, none on CUDA)")
    parser.add_argument("--prefill-length", type=int, default=100_000)
    parser.add_argument("--stream-lengths", nargs="+", type=int, default=[125_000, 250_000, 500_000, 1_000_000])
    args = parser.parse_args()
    common = {"model_dir": args.model_dir, "preset": args.preset}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}"
          f"{', weights ' + args.model_dir if args.model_dir else ', random weights'}\n")

    if "decode" in args.sections:
        llama_max = args.llama_max_position or (131072 if args.device == "cpu" else math.inf)
        print(f"## Decode by position: batch 1, greedy, {args.device}, {args.dtype}"
              f"{', compiled' if args.compile else ''}\n")
        print("| model | position | decode tok/s | ms/token | prefill tok/s | state or KV cache bytes |")
        print("|---|---|---|---|---|---|")
        rates = {}
        for arch in ("megalodon", "llama"):
            for position in args.positions:
                if arch == "llama" and position > llama_max:
                    print(f"| {arch} | {position:,} | skipped (--llama-max-position) | | | |", flush=True)
                    continue
                r = _in_subprocess("decode_rate", arch=arch, position=position, steps=args.decode_steps,
                                   device=args.device, dtype=args.dtype, compile=args.compile,
                                   llama_prefill_limit=args.llama_prefill_limit, threads=args.threads,
                                   **common)
                rates.setdefault(arch, []).append(r["decode_tokens_per_s"])
                prefill = "synthetic" if math.isnan(r["prefill_tokens_per_s"]) else f"{r['prefill_tokens_per_s']:,.0f}"
                print(f"| {arch} | {position:,} | {r['decode_tokens_per_s']:,.1f} | {r['ms_per_step']:.2f} | "
                      f"{prefill} | {r['state_bytes']:,} |", flush=True)
        for arch, values in rates.items():
            print(f"\n{arch}: decode speed at the first position / at the last = {values[0] / values[-1]:.2f}")
        print()

    if "prefill" in args.sections:
        print("## Prefill\n")
        result = _in_subprocess("prefill_rate", length=args.prefill_length, **common)
        print(f"prefill of {args.prefill_length:,} tokens: {result['prefill_tokens_per_s']:,.0f} tok/s; training "
              f"forward (8 x 1024, autograd on): {result['train_forward_tokens_per_s']:,.0f} tok/s; ratio "
              f"{result['prefill_tokens_per_s'] / result['train_forward_tokens_per_s']:.2f}\n", flush=True)

    if "stream" in args.sections:
        print("## Streaming perplexity (a book repeated)\n")
        print("| stream tokens | wall s | tok/s | perplexity | peak RSS MB |")
        print("|---|---|---|---|---|")
        for length in args.stream_lengths:
            r = _in_subprocess("stream_perplexity", length=length, **common)
            print(f"| {length:,} | {r['seconds']:.1f} | {length / r['seconds']:,.0f} | {r['perplexity']:.2f} | "
                  f"{r['peak_rss_mb']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
