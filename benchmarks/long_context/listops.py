"""ListOps with the sequence-classification head: Megalodon against the matched Llama on the ListOps recipe
(depth <= 3, 16-64 tokens, classes 0-9), 3 seeds, accuracy on held-out lists overall and by nesting depth.

    python benchmarks/long_context/listops.py                # the small settings: the recipe's 400 steps
"""

from __future__ import annotations

import argparse
import statistics

from common import RUNS, already_done, command, machine, markdown_table, save_results, setup, task_model

from megalodon.tasks import predict, recipe, score_classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--tag", default="small")
    args = parser.parse_args()
    if already_done(f"listops-{args.tag}"):
        return
    setup(args.threads)
    out = RUNS / f"listops-{args.tag}"
    results = {"command": command(), "machine": machine(), "seeds": args.seeds, "models": {}}
    for arch in ("megalodon", "llama"):
        results["models"][arch] = runs = []
        for seed in args.seeds:
            task, cfg = recipe("listops", arch=arch, seed=seed, **({"max_steps": args.steps} if args.steps else {}))
            model, record = task_model(out / f"{arch}-s{seed}", task, cfg)
            examples = task.examples("test", args.examples, seed)
            guesses = predict(model, task, examples, 64)
            by_depth = {depth: score_classes([g for g, e in zip(guesses, examples) if e.info["depth"] == depth],
                                             [e for e in examples if e.info["depth"] == depth])
                        for depth in sorted({e.info["depth"] for e in examples})}
            runs.append({"seed": seed, "training": record, "overall": score_classes(guesses, examples),
                         "by_depth": by_depth, "majority": max(sum(e.label == c for e in examples)
                                                               for c in range(10)) / len(examples),
                         "budget": {"steps": cfg.max_steps, "batch_size": cfg.batch_size, "lr": cfg.lr}})
            print(arch, seed, runs[-1]["overall"], flush=True)
    save_results(f"listops-{args.tag}", results, table(results))


def table(results: dict) -> str:
    depths = sorted({d for runs in results["models"].values() for r in runs for d in r["by_depth"]})
    header = ["model", "accuracy"] + [f"depth {d}" for d in depths] + ["majority class"]
    rows = []
    for arch, runs in results["models"].items():
        rows.append([arch, _mean_sd([r["overall"]["accuracy"] for r in runs])]
                    + [_mean_sd([r["by_depth"][d]["accuracy"] for r in runs if d in r["by_depth"]]) for d in depths]
                    + [_mean_sd([r["majority"] for r in runs])])
    return f"ListOps test accuracy, mean ± sd over seeds {results['seeds']} (chance 0.1)\n\n" + \
        markdown_table(header, rows)


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


if __name__ == "__main__":
    main()
