"""Inference at long context: decode speed and state size by position, prefill speed, streaming perplexity.

    python benchmarks/bench_inference.py                       # small preset, random weights
    python benchmarks/bench_inference.py --model-dir runs/demo/model --stream-lengths 125000 1000000

Megalodon's state does not grow with the stream, so decode speed and memory should be flat in position; the
matched Llama's KV cache (full attention) grows linearly, shown beside it. Each streaming-perplexity run is a
fresh subprocess, so its peak RSS is its own. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_model import in_subprocess, llama_kv_bytes, peak_rss_mb  # noqa: E402

from megalodon.inference.stream import default_block_tokens  # noqa: E402


def _load(model_dir: str | None, preset: str):
    from megalodon import Megalodon, MegalodonConfig
    from megalodon.checkpoint import load_pretrained

    torch.manual_seed(0)
    model = load_pretrained(model_dir) if model_dir else Megalodon(MegalodonConfig.from_preset(preset))
    return model.eval()


@torch.no_grad()
def decode_by_position(model_dir: str | None, preset: str, positions: list[int], steps: int) -> list[dict]:
    """One stream: prefill up to each position in turn (vectorized blocks), then time `steps` decode steps."""
    model = _load(model_dir, preset)
    vocab, block = model.config.vocab_size, default_block_tokens(model.config.chunk_size)
    generator = torch.Generator().manual_seed(0)
    state, position, rows = None, 0, []
    for target in positions:
        while position < target:
            size = min(block, target - position)
            ids = torch.randint(0, vocab, (1, size), generator=generator)
            _, state = model(ids, state=state, return_state=True, logits_to_keep=1)
            position += size
        bytes_at_position = state.nbytes
        token = torch.zeros(1, 1, dtype=torch.long)
        for _ in range(5):  # warm-up
            _, state = model(token, state=state, return_state=True)
        start = time.perf_counter()
        for _ in range(steps):
            logits, state = model(token, state=state, return_state=True)
            token = logits[:, -1:].argmax(-1)
        rows.append({"position": target, "decode_tokens_per_s": steps / (time.perf_counter() - start),
                     "state_bytes": bytes_at_position})
        position += steps + 5
    return rows


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
    parser.add_argument("--positions", nargs="+", type=int, default=[1024, 16384, 131072, 1048576])
    parser.add_argument("--decode-steps", type=int, default=100)
    parser.add_argument("--prefill-length", type=int, default=100_000)
    parser.add_argument("--stream-lengths", nargs="+", type=int, default=[125_000, 250_000, 500_000, 1_000_000])
    args = parser.parse_args()
    common = {"model_dir": args.model_dir, "preset": args.preset}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, preset {args.preset}"
          f"{', weights ' + args.model_dir if args.model_dir else ', random weights'}\n")

    print("## Decode by position (one stream, batch 1)\n")
    print("| position | decode tok/s | Megalodon state bytes | Llama KV bytes (full attention) |")
    print("|---|---|---|---|")
    rows = _in_subprocess("decode_by_position", positions=args.positions, steps=args.decode_steps, **common)
    for row in rows:
        print(f"| {row['position']:,} | {row['decode_tokens_per_s']:,.1f} | {row['state_bytes']:,} | "
              f"{llama_kv_bytes(args.preset, row['position']):,} |")
    print(f"\ndecode speed at {rows[0]['position']:,} / at {rows[-1]['position']:,}: "
          f"{rows[0]['decode_tokens_per_s'] / rows[-1]['decode_tokens_per_s']:.2f}\n", flush=True)

    print("## Prefill\n")
    result = _in_subprocess("prefill_rate", length=args.prefill_length, **common)
    print(f"prefill of {args.prefill_length:,} tokens: {result['prefill_tokens_per_s']:,.0f} tok/s; training "
          f"forward (8 x 1024, autograd on): {result['train_forward_tokens_per_s']:,.0f} tok/s; ratio "
          f"{result['prefill_tokens_per_s'] / result['train_forward_tokens_per_s']:.2f}\n", flush=True)

    print("## Streaming perplexity (a book repeated)\n")
    print("| stream tokens | wall s | tok/s | perplexity | peak RSS MB |")
    print("|---|---|---|---|---|")
    for length in args.stream_lengths:
        r = _in_subprocess("stream_perplexity", length=length, **common)
        print(f"| {length:,} | {r['seconds']:.1f} | {length / r['seconds']:,.0f} | {r['perplexity']:.2f} | "
              f"{r['peak_rss_mb']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
