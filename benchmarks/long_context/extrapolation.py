"""Experiments 1 and 4 (language modeling): loss by position on whole held-out Austen novels, far past the
1024-token training window, and stateful against stateless training.

The models are experiment 5's seed-0 Austen runs (Megalodon and the Llama on the same tokens) plus a Megalodon
trained on the same tokens without carrying its state across windows (`--stateful false`); for seeds 1 and 2 the
stateful/stateless pair is compared on the trainer's final validation only (`--corpus` picks another built-in
corpus, e.g. `bible`: its held-out books are evaluated the same way). The Austen corpus
splits by novel: four train, one validation, one test; both held-out novels are evaluated whole, each from its
first token, in one stream per novel.

    megalodon             streams its state through the whole novel (constant memory)
    megalodon-stateless   the same, trained on isolated 1024-token windows
    llama-full            full attention up to --max-context tokens, then a sliding window of that size
    llama-window          a 1024-token sliding window (what it was trained on)
    megalodon, reset      the streaming Megalodon with its state emptied every 1024 tokens: what the long state
                          is worth (bits/byte over the same tokens)

    python benchmarks/long_context/extrapolation.py --threads 1    # the small settings (after head_to_head)
    # once the seed-0 models are trained: the evaluations in two processes, then the table from both
    python benchmarks/long_context/extrapolation.py --only llama-full llama-window &
    python benchmarks/long_context/extrapolation.py --only megalodon megalodon-stateless megalodon-reset; wait
    python benchmarks/long_context/extrapolation.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, replace

from common import IMAGES, RUNS, command, machine, markdown_table, save_results, setup
from head_to_head import _mean_sd, _sd, base_config, run_dir, trained

from megalodon.checkpoint import load_pretrained
from megalodon.data import TokenStore
from megalodon.inference.evaluate import EvalDocument, EvalResult, documents_from_store, evaluate
from megalodon.inference.plots import plot_loss_by_position
from megalodon.training.data import prepare_data


EVALUATIONS = ("megalodon", "megalodon-stateless", "llama-full", "llama-window", "megalodon-reset")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--corpus", default="austen")
    parser.add_argument("--max-context", type=int, default=8192, help="the Llama's full-attention limit")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--tag", default="small")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="seeds of the stateful/stateless pair (validation bits/byte); seed 0 is evaluated whole")
    parser.add_argument("--only", nargs="+", choices=EVALUATIONS,
                        help="run only these evaluations and write no table (to run them in parallel processes; "
                             "a run without --only then assembles the table from the kept results)")
    args = parser.parse_args()
    setup(args.threads)
    cfg = base_config(args.steps, args.preset, args.corpus, 0)
    runs = {"megalodon": trained(cfg, run_dir(args.tag, args.corpus, "megalodon", 0)),
            "megalodon-stateless": trained(replace(cfg, stateful=False),
                                           run_dir(args.tag, args.corpus, "megalodon-stateless", 0)),
            "llama": trained(replace(cfg, arch="llama"), run_dir(args.tag, args.corpus, "llama", 0))}
    pairs = {}  # the other seeds' pairs: trained by the run that writes the table, not by --only runs side by side
    for seed in [] if args.only else args.seeds:
        seed_cfg = base_config(args.steps, args.preset, args.corpus, seed)
        pairs[seed] = {name: trained(replace(seed_cfg, stateful=name == "megalodon"),
                                     run_dir(args.tag, args.corpus, name, seed))["val_bpb"]
                       for name in ("megalodon", "megalodon-stateless")}
    store_dir, _ = prepare_data(cfg)
    documents = [doc for split in ("val", "test") for doc in documents_from_store(TokenStore(store_dir, split))]
    evaluations = []
    for key, label, name, settings in (
            ("megalodon", "megalodon", "megalodon", {}),
            ("megalodon-stateless", "megalodon-stateless", "megalodon-stateless", {}),
            ("llama-full", f"llama-full (to {args.max_context // 1024}K)", "llama", {"max_context": args.max_context}),
            ("llama-window", "llama-window (1K)", "llama", {"window": cfg.seq_len}),
            ("megalodon-reset", "megalodon, state reset every 1K", "megalodon", {"reset": cfg.seq_len})):
        if args.only and key not in args.only:
            continue
        # each finished evaluation is kept, so an interrupted run resumes at the next one
        variant = settings.get("window") or (f"reset{settings['reset']}" if "reset" in settings else "full")
        cached = RUNS / f"extrapolation-{args.tag}" / f"eval-{name}-{variant}.json"
        if cached.is_file():
            result = EvalResult(**json.loads(cached.read_text()))
        else:
            model = load_pretrained(runs[name]["run_dir"] + "/model")
            if "reset" in settings:
                result = evaluate(model, pieces(documents, settings["reset"]), label=label)
            else:
                result = evaluate(model, documents, label=label, **settings)
            result.settings["commit"] = machine()["commit"]
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(asdict(result)))
        print(label, result.perplexity, result.bits_per_byte, f"{result.seconds:.0f} s", flush=True)
        evaluations.append(result)
    if args.only:
        return
    results = {"command": command(), "machine": machine(), "seed": 0, "documents": [
        {"name": d.name, "tokens": int(d.ids.numel())} for d in documents],
        "budget": {"preset": args.preset, "steps": args.steps, "seq_len": cfg.seq_len,
                   "batch_size": cfg.batch_size, "tokens": args.steps * cfg.batch_size * cfg.seq_len},
        "training": runs, "stateful_pairs": pairs, "evaluations": [r.to_dict() for r in evaluations]}
    reset = evaluations.pop()  # its positions restart every piece: a bits/byte, not a curve
    save_results(f"extrapolation-{args.tag}", results, table(evaluations) + "\n" + reset_line(evaluations[0], reset)
                 + "\n" + pairs_table(pairs))
    plot_loss_by_position(evaluations, IMAGES / f"extrapolation_{args.tag}.png",
                          f"Held-out {args.corpus} documents, {args.preset} models trained on 1024-token windows")


def pieces(documents: list[EvalDocument], every: int) -> list[EvalDocument]:
    """Each document cut into independent pieces that predict `every` tokens each (consecutive pieces share one
    token, so every token predicted in the whole document is predicted once), the bytes shared out pro rata:
    streamed one by one, the model's state starts empty every `every` tokens, with the same tokens and bytes."""
    out = []
    for doc in documents:
        predicted = doc.ids.numel() - 1
        for begin in range(0, predicted, every):
            end = min(begin + every, predicted)
            n_bytes = round(doc.n_bytes * end / predicted) - round(doc.n_bytes * begin / predicted)
            out.append(EvalDocument(doc.ids[begin:end + 1], n_bytes, f"{doc.name}[{begin}:{end}]"))
    return out


def reset_line(streamed, reset) -> str:
    return (f"The same Megalodon with its state reset every 1K tokens: {reset.bits_per_byte:.4f} bits/byte, against "
            f"{streamed.bits_per_byte:.4f} streamed ({reset.nll / reset.n_tokens:.4f} against "
            f"{streamed.nll / streamed.n_tokens:.4f} nats/token over the same {reset.n_tokens:,} tokens)\n")


def table(evaluations) -> str:
    edges = evaluations[0].bucket_edges
    header = ["model", "bits/byte"] + [f"{_k(a)}-{_k(b)}" for a, b in zip(edges, edges[1:])]
    rows = [[r.label, r.bits_per_byte] + [b["mean_loss"] if b["tokens"] else "" for b in r.buckets()]
            for r in evaluations]
    return "Mean loss (nats/token) by position bucket, the held-out documents together\n\n" + \
        markdown_table(header, rows)


def pairs_table(pairs: dict) -> str:
    """Stateful against stateless training: the trainer's final validation (the whole held-out novel, streamed)."""
    a = [p["megalodon"] for p in pairs.values()]
    b = [p["megalodon-stateless"] for p in pairs.values()]
    sd = max(_sd(a), _sd(b))
    diff = statistics.mean(a) - statistics.mean(b)
    verdict = "tie" if abs(diff) < sd else ("stateful better" if diff < 0 else "stateless better")
    rows = [[f"seed {seed}", p["megalodon"], p["megalodon-stateless"],
             f"{p['megalodon'] - p['megalodon-stateless']:+.3f}"] for seed, p in pairs.items()]
    rows.append(["mean ± sd", _mean_sd(a), _mean_sd(b), f"{diff:+.3f} ({verdict})"])
    return "Validation bits/byte, stateful against stateless training\n\n" + markdown_table(
        ["seed", "stateful", "stateless", "difference"], rows)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 else str(n)


if __name__ == "__main__":
    main()
