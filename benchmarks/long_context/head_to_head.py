"""Experiment 5: Megalodon `small` against the parameter-matched Llama, 3 seeds, two corpora, with error bars.

Phase `tokens`: both architectures train on the same tokens (same seed: same data order) for the same steps.
Phase `walltime` (run it last: the machine is shared and wall-clock is noisy): both train for the same
wall-clock seconds of training loop (`--seconds`), Megalodon and the Llama of each seed one after the other so
that they meet similar load; the faster one sees more tokens.

Each run is the project's own trainer (`megalodon train`), validated at the end on the whole validation split
(bits per byte over whole documents, Megalodon streaming its state, the Llama in 1024-token windows).
A difference between means smaller than the larger standard deviation is reported as a tie.

    python benchmarks/long_context/head_to_head.py --phase tokens          # the small settings: 48 steps of 4x1024
    python benchmarks/long_context/head_to_head.py --phase walltime --seconds 60
    python benchmarks/long_context/head_to_head.py --phase tokens --steps 200 --tag long200   # a tag holds one budget
    python benchmarks/long_context/head_to_head.py --plot                  # the figure from both phases' results
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from common import DATA, IMAGES, RUNS, command, load_json, machine, markdown_table, pyplot, save_results, setup

from megalodon.training.config import TrainConfig
from megalodon.training.trainer import train

CORPORA = ("shakespeare", "austen")
SEEDS = (0, 1, 2)


def base_config(steps: int, preset: str, corpus: str, seed: int) -> TrainConfig:
    return TrainConfig(preset=preset, data=corpus, data_dir=DATA, seq_len=1024, batch_size=4, max_steps=steps,
                       warmup_steps=max(6, steps // 10), lr=1e-3, eval_every=0, checkpoint_every=0,
                       keep_checkpoints=1, sample_tokens=8, log_every=10, seed=seed)


def run_dir(tag: str, corpus: str, name: str, seed: int) -> Path:
    return RUNS / f"lm-{tag}" / corpus / f"{name}-s{seed}"


def trained(cfg: TrainConfig, out: Path) -> dict:
    """The run's summary, training it first unless a finished run is already there."""
    summary = out / "summary.json"
    if not summary.is_file():
        train(cfg, out, overwrite=True, progress=False)
    return {**json.loads(summary.read_text()), "run_dir": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["tokens", "walltime"])
    parser.add_argument("--plot", action="store_true", help="only draw the figure from the phases' saved results")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=60.0, help="walltime phase: training seconds per run")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--tag", default="small")
    args = parser.parse_args()
    if args.plot:
        return print(plot(args.tag))
    if args.phase is None:
        parser.error("give --phase tokens or --phase walltime (or --plot)")
    setup(args.threads)
    runs = {}
    for corpus in args.corpora:
        for seed in args.seeds:
            cfg = base_config(args.steps, args.preset, corpus, seed)
            for arch in ("megalodon", "llama"):
                if args.phase == "tokens":
                    name, run_cfg = arch, replace(cfg, arch=arch)
                else:
                    name = f"{arch}-walltime"
                    run_cfg = replace(cfg, arch=arch, max_steps=0, time_budget_min=args.seconds / 60)
                runs[f"{corpus}/{name}/{seed}"] = trained(run_cfg, run_dir(args.tag, corpus, name, seed))
    results = {"command": command(), "machine": machine(), "phase": args.phase, "seeds": args.seeds,
               "budget": {"preset": args.preset, "seq_len": 1024, "batch_size": 4, **(
                   {"steps": args.steps, "tokens": args.steps * 4 * 1024} if args.phase == "tokens"
                   else {"seconds": args.seconds})}, "runs": runs}
    save_results(f"head-to-head-{args.tag}-{args.phase}", results, table(results, args))
    plot(args.tag)


def table(results: dict, args) -> str:
    suffix = "" if args.phase == "tokens" else "-walltime"
    header = ["corpus", "megalodon bits/byte", "llama bits/byte", "difference (mega - llama)", "paired differences",
              "verdict", "megalodon tok/s", "llama tok/s", "megalodon tokens", "llama tokens"]
    rows = []
    for corpus in args.corpora:
        mega = [results["runs"][f"{corpus}/megalodon{suffix}/{s}"] for s in args.seeds]
        other = [results["runs"][f"{corpus}/llama{suffix}/{s}"] for s in args.seeds]
        a, b = [r["val_bpb"] for r in mega], [r["val_bpb"] for r in other]
        diff = statistics.mean(a) - statistics.mean(b)
        spread = max(_sd(a), _sd(b))
        verdict = "tie" if abs(diff) < spread else ("Megalodon better" if diff < 0 else "Llama better")
        rows.append([corpus, _mean_sd(a), _mean_sd(b), f"{diff:+.3f}", " ".join(f"{x - y:+.3f}" for x, y in zip(a, b)),
                     verdict, f"{statistics.mean(r['tokens_per_s'] for r in mega):,.0f}",
                     f"{statistics.mean(r['tokens_per_s'] for r in other):,.0f}",
                     f"{statistics.mean(r['tokens'] for r in mega):,.0f}",
                     f"{statistics.mean(r['tokens'] for r in other):,.0f}"])
    return markdown_table(header, rows)


def plot(tag: str) -> Path:
    """Validation bits/byte of every seed, both architectures, each phase that has results, one panel per corpus."""
    phases = {phase: load_json(RUNS / f"head-to-head-{tag}-{phase}" / "results.json")
              for phase in ("tokens", "walltime")}
    phases = {phase: r for phase, r in phases.items() if r}
    corpora = list(dict.fromkeys(key.split("/")[0] for r in phases.values() for key in r["runs"]))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(corpora), figsize=(4.5 * len(corpora), 3.6), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        ticks = []
        for p, (phase, r) in enumerate(phases.items()):
            suffix = "" if phase == "tokens" else "-walltime"
            if f"{corpus}/megalodon{suffix}/{r['seeds'][0]}" not in r["runs"]:
                continue  # this phase ran on other corpora (the suite runs each corpus in its own lane)
            paired = [[r["runs"][f"{corpus}/{arch}{suffix}/{seed}"]["val_bpb"] for seed in r["seeds"]]
                      for arch in ("megalodon", "llama")]
            for pair in zip(*paired):  # the same seed (same data order) joined: the differences are paired
                ax.plot([2.5 * p, 2.5 * p + 1], pair, color="0.7", linewidth=0.8, zorder=0)
            for a, ((arch, color), values) in enumerate(zip((("megalodon", "C0"), ("llama", "C1")), paired)):
                x = 2.5 * p + a
                ax.scatter([x] * len(values), values, color=color, alpha=0.6, s=18)
                ax.errorbar(x + 0.2, statistics.mean(values), yerr=_sd(values), fmt="o", color=color, capsize=4,
                            label=arch if not ticks else None)
            budget = "equal tokens" if phase == "tokens" else f"equal time ({r['budget']['seconds']:.0f} s)"
            ticks.append((2.5 * p + 0.5, budget))
        ax.set_xticks([t for t, _ in ticks], [label for _, label in ticks])
        ax.set_title(corpus)
        ax.set_ylabel("validation bits/byte (lower is better)")
        ax.legend(fontsize=8)
    fig.suptitle(f"Megalodon vs Llama, seeds and mean ± sd ({tag} settings)", fontsize=10)
    fig.tight_layout()
    IMAGES.mkdir(parents=True, exist_ok=True)
    out = IMAGES / f"head_to_head_{tag}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {_sd(values):.3f}"


if __name__ == "__main__":
    main()
