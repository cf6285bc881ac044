"""transformers' generate() against the core's static decode, on the same model in one process.

    python benchmarks/bench_hf.py                                   # small, random weights, CPU, 1 thread
    python benchmarks/bench_hf.py --preset mega200M --device cuda --dtype bfloat16 --position 2048

generate() pays for its own per-step work (logits processors, stopping criteria, the attention mask grown by one
column each step) on top of the model's step. Its decode rate is the slope between two greedy generations from the
same prompt, one `--tokens` longer than the other, so that the prompt's prefill drops out. The core's rate is
`measure_decode` (what `megalodon generate` runs per token, sampling aside). The two alternate, `--repeats`
times; the table gives the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SHORT = 8  # new tokens of the shorter generation


def timed_generate(model, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_rates(core, position: int, tokens: int, repeats: int) -> dict:
    """Median decode tok/s of generate() on `core` wrapped for transformers, and of the core's static decode,
    alternating `repeats` times, after a prompt of `position` random tokens. core: in eval mode, on its device
    and in its dtype."""
    from megalodon.hf import wrap
    from megalodon.inference.benchmark import measure_decode

    hf_model = wrap(core)  # no eos id: every generation runs to its length
    prompt = torch.randint(0, core.config.vocab_size, (1, position), device=core.embed.weight.device)
    timed_generate(hf_model, prompt, SHORT)  # warm-up (and a CUDA graph's capture)
    hf_rates, core_rates = [], []
    for _ in range(repeats):
        longer, shorter = timed_generate(hf_model, prompt, SHORT + tokens), timed_generate(hf_model, prompt, SHORT)
        hf_rates.append(tokens / (longer - shorter))
        core_rates.append(measure_decode(core, position, tokens)["decode_tokens_per_s"])
    return {"generate_tokens_per_s": statistics.median(hf_rates), "core_tokens_per_s": statistics.median(core_rates),
            "position": position, "tokens": tokens, "repeats": repeats}


def table(result: dict) -> str:
    hf_rate, core_rate = result["generate_tokens_per_s"], result["core_tokens_per_s"]
    return ("| path | decode tok/s | of the core's |\n|---|---|---|\n"
            f"| transformers generate() | {hf_rate:,.1f} | {hf_rate / core_rate:.2f} |\n"
            f"| core static decode (measure_decode) | {core_rate:,.1f} | 1.00 |\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--position", type=int, default=1024, help="prompt tokens before decoding")
    parser.add_argument("--tokens", type=int, default=128, help="decode steps timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.position < 1 or args.tokens < 1 or args.repeats < 1:
        parser.error("--position, --tokens and --repeats must be at least 1")

    from megalodon import Megalodon, MegalodonConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    core = Megalodon(MegalodonConfig.from_preset(args.preset)).eval().to(args.device, getattr(torch, args.dtype))
    result = decode_rates(core, args.position, args.tokens, args.repeats)
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, {args.threads} thread(s); {args.preset}, "
          f"batch 1, greedy, {args.tokens} tokens after a {args.position}-token prompt, median of {args.repeats}\n")
    print(table(result))


if __name__ == "__main__":
    main()
