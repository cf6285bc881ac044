"""Experiment 2: passkey retrieval accuracy against haystack length and needle depth, a heatmap per model.

Tiny byte-level models are trained on the passkey recipe (256-token Shakespeare haystacks, the needle anywhere)
and scored on held-out plays at 1x, 4x, 16x and 64x the training window, with the needle at 10%-90% depth.

    megalodon       the recipe: 64-token attention chunks, so the needle is usually in an earlier chunk
    llama           the matched Llama, full attention (past 256 tokens its rotary positions are unseen)
    llama-window    the same Llama evaluated with a 256-token sliding window (the needle drops out of view)

    python benchmarks/long_context/passkey.py                # the small settings
    python benchmarks/long_context/passkey.py --steps 1500 --tag long
"""

from __future__ import annotations

import argparse

from common import (
    DATA, IMAGES, RUNS, already_done, command, machine, markdown_table, pyplot, save_results, setup, task_model,
)

from megalodon.tasks import Passkey, evaluate_task, recipe

DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]
MULTIPLES = [1, 4, 16, 64]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=20, help="test examples per (length, depth) cell")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--tag", default="small")
    args = parser.parse_args()
    if already_done(f"passkey-{args.tag}"):
        return
    setup(args.threads)
    out = RUNS / f"passkey-{args.tag}"
    results = {"command": command(), "machine": machine(), "seed": args.seed, "depths": DEPTHS, "models": {}}
    trained = {}
    for arch in ("megalodon", "llama"):
        overrides = dict(arch=arch, seed=args.seed, **({"max_steps": args.steps} if args.steps else {}))
        task, cfg = recipe("passkey", {"data_dir": DATA}, **overrides)
        trained[arch] = (*task_model(out / arch, task, cfg), task, cfg)
    window = trained["llama"][3].seq_len
    results["lengths"] = lengths = [m * window for m in MULTIPLES]
    for label, arch, attention in (("megalodon", "megalodon", None), ("llama", "llama", None),
                                   ("llama-window", "llama", window)):
        model, record, task, cfg = trained[arch]
        grid = {}
        for length in lengths:
            for depth in DEPTHS:
                test = Passkey(**{**task.settings(), "length": length, "depth": depth})
                score = evaluate_task(model, test, test.examples("test", args.examples, args.seed),
                                      max(1, 16384 // length), attention)
                grid[f"{length}@{depth}"] = score
                print(label, length, depth, score, flush=True)
        results["models"][label] = {"training": record, "grid": grid, "attention_window": attention, "budget": {
            "steps": cfg.max_steps, "batch_size": cfg.batch_size, "window": cfg.seq_len, "lr": cfg.lr,
            "chunk_size": cfg.model.get("chunk_size")}}
    save_results(f"passkey-{args.tag}", results, table(results))
    plot(results, IMAGES / f"passkey_{args.tag}.png")


def table(results: dict) -> str:
    header = ["model", "metric"] + [f"{length}" for length in results["lengths"]]
    rows = []
    for label, r in results["models"].items():
        for metric in ("exact_match", "token_accuracy"):
            rows.append([label, metric] + [sum(r["grid"][f"{n}@{d}"][metric] for d in results["depths"])
                                           / len(results["depths"]) for n in results["lengths"]])
    return ("Mean over needle depths 10%-90%, by haystack length in tokens (exact match: all 5 digits; token "
            "accuracy: digits right, chance about 0.1)\n\n" + markdown_table(header, rows))


def plot(results: dict, path) -> None:
    plt = pyplot()
    labels = list(results["models"])
    fig, axes = plt.subplots(1, len(labels), figsize=(4.4 * len(labels), 3.6), squeeze=False, sharey=True)
    for ax, label in zip(axes[0], labels):
        grid = results["models"][label]["grid"]
        values = [[grid[f"{n}@{d}"]["token_accuracy"] for n in results["lengths"]] for d in results["depths"]]
        image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.5 else "black")
        ax.set_xticks(range(len(results["lengths"])), [f"{n // 1024}K" if n >= 1024 else str(n)
                                                       for n in results["lengths"]])
        ax.set_yticks(range(len(results["depths"])), [f"{d:.0%}" for d in results["depths"]])
        ax.set_xlabel("haystack length (tokens)")
        ax.set_title(f"{label}: digit accuracy")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
