"""Experiments 3 and 4 (tasks): associative recall and selective copy accuracy against the gap, where the gap is
longer than Megalodon's 32-token attention chunk, so only the CEMA (and the norm statistics) can carry the
answer across. Variants, each trained from the task's recipe on the same examples:

    megalodon          CEMA, whole-example backpropagation (examples fit the 256-token training window)
    megalodon-real     the real-valued EMA ablation: every CEMA angle pinned at 0 (theta = -1e4, frozen)
    llama              the matched Llama, full attention over the whole example
    megalodon-tbptt    CEMA trained on 32-token windows with the state carried, detached (truncated BPTT)
    megalodon-windows  CEMA trained on isolated 32-token windows (stateless)

Every model is scored on the whole example, streamed (Megalodon carries its state; the Llama attends to all).

    python benchmarks/long_context/memory.py                 # the small settings: the recipes' 400 steps, 3 seeds
    python benchmarks/long_context/memory.py --steps 1500 --tag long
"""

from __future__ import annotations

import argparse
import statistics

from common import IMAGES, RUNS, already_done, command, machine, markdown_table, pyplot, save_results, setup, task_model

from megalodon.tasks import answer_chance, evaluate_task, make_task, recipe

VARIANTS = {
    "megalodon": dict(arch="megalodon", ema="complex", window=None, stateful=True),
    "megalodon-real": dict(arch="megalodon", ema="real", window=None, stateful=True),
    "llama": dict(arch="llama", ema="complex", window=None, stateful=True),
    "megalodon-tbptt": dict(arch="megalodon", ema="complex", window=32, stateful=True),
    "megalodon-windows": dict(arch="megalodon", ema="complex", window=32, stateful=False),
}
GAPS = [0, 16, 32, 64, 96, 128, 256, 512, 1024]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["recall", "copy"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--examples", type=int, default=200, help="test examples per gap")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--tag", default="small")
    args = parser.parse_args()
    if already_done(f"memory-{args.tag}"):
        return
    setup(args.threads)
    out = RUNS / f"memory-{args.tag}"
    results = {"command": command(), "machine": machine(), "seeds": args.seeds, "gaps": GAPS, "tasks": {}}
    for name in args.tasks:
        results["tasks"][name] = per_task = {}
        for variant in args.variants:
            per_task[variant] = [run_variant(name, variant, seed, args, out) for seed in args.seeds]
    save_results(f"memory-{args.tag}", results, tables(results))
    plot(results, IMAGES / f"memory_{args.tag}.png")


def run_variant(name: str, variant: str, seed: int, args, out) -> dict:
    """Train (or load) one variant at one seed and score it at every gap on the same test examples."""
    v = VARIANTS[variant]
    overrides = dict(arch=v["arch"], stateful=v["stateful"], seed=seed)
    if v["window"]:
        overrides["seq_len"] = v["window"]
    if args.steps:
        overrides["max_steps"] = args.steps
    task, cfg = recipe(name, **overrides)
    model, record = task_model(out / name / f"{variant}-s{seed}", task, cfg, v["ema"])
    accuracy = {}
    for gap in GAPS:
        test = make_task(name, **{**task.settings(), "gap": gap})
        accuracy[gap] = evaluate_task(model, test, test.examples("test", args.examples, seed), 16)
        print(name, variant, seed, gap, accuracy[gap], flush=True)
    return {"seed": seed, "training": record, "train_settings": task.settings(), "accuracy": accuracy,
            "budget": {"steps": cfg.max_steps, "batch_size": cfg.batch_size, "window": cfg.seq_len, "lr": cfg.lr},
            "chance": answer_chance(task)}


def mean_sd(runs: list[dict], gap: int) -> tuple[float, float]:
    values = [r["accuracy"][gap]["token_accuracy"] for r in runs]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def tables(results: dict) -> str:
    text = []
    for name, per_task in results["tasks"].items():
        header = ["variant"] + [f"gap {g}" for g in results["gaps"]]
        rows = [[variant] + ["{:.2f} ± {:.2f}".format(*mean_sd(runs, g)) for g in results["gaps"]]
                for variant, runs in per_task.items()]
        chance = next(iter(per_task.values()))[0]["chance"]
        text.append(f"**{name}**: answer-token accuracy, mean ± standard deviation over seeds "
                    f"{results['seeds']} (chance {chance:.3f})\n\n" + markdown_table(header, rows))
    return "\n".join(text)


def plot(results: dict, path) -> None:
    plt = pyplot()
    names = list(results["tasks"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        per_task = results["tasks"][name]
        gaps = results["gaps"]
        xs = [max(g, 1) for g in gaps]
        for variant, runs in per_task.items():
            means, sds = zip(*(mean_sd(runs, g) for g in gaps))
            line, = ax.plot(xs, means, marker="o", label=variant)
            ax.fill_between(xs, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)],
                            color=line.get_color(), alpha=0.15)
        ax.axhline(next(iter(per_task.values()))[0]["chance"], color="grey", ls=":", label="chance")
        ax.axvline(32, color="black", ls="--", lw=0.8, label="attention chunk (32)")
        ax.axvline(96, color="red", ls="--", lw=0.8, label="longest training gap (96)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("gap (noise tokens; 0 drawn at 1)")
        ax.set_ylabel("answer token accuracy")
        ax.set_title(f"{name}: accuracy vs gap (mean ± sd over {len(results['seeds'])} seeds)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
