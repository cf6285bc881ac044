"""`megalodon train` and `megalodon compare`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megalodon.training.config import TrainConfig, apply_overrides, read_config_file
from megalodon.training.run_dir import atomic_write_text, saved_options

QUICK = {"preset": "tiny", "tokenizer": "byte", "seq_len": 128, "batch_size": 4, "max_steps": 40, "eval_every": 20,
         "warmup_steps": 10, "checkpoint_every": 20, "sample_tokens": 60, "log_every": 5, "lr": 3e-3,
         "time_budget_min": 0.0}


def given_options(args: argparse.Namespace, overrides: list[str]) -> dict:
    """The options the user gave: a config file, --quick, then --key value overrides."""
    values = read_config_file(args.config) if args.config else {}
    if args.quick:
        values = {**values, **QUICK}
    return apply_overrides(values, overrides)


def resolve_config(args: argparse.Namespace, overrides: list[str], run_dir: Path | None = None) -> TrainConfig:
    """The run's config. With --resume and a run in run_dir, its saved options with the given ones on top (the
    trainer refuses those that would change what the run computes), so that `--resume --run-dir DIR` alone
    continues the run."""
    given = given_options(args, overrides)
    if not args.resume or run_dir is None:
        return TrainConfig.from_dict(given)
    if (run_dir / "train_config.json").is_file():
        saved = saved_options(run_dir)
        model = given.get("model") or {}
        model = {**saved.get("model", {}), **model} if isinstance(model, dict) else model
        return TrainConfig.from_dict({**saved, **given, "model": model})
    try:  # nothing saved yet: --resume on a new directory starts the run the options describe
        return TrainConfig.from_dict(given)
    except ValueError as err:
        raise ValueError(f"{run_dir} holds no run to resume (no train_config.json), and the options given do not "
                         f"describe a new one: {err}") from None


def _default_run_dir(values: dict) -> Path:
    return Path("runs") / f"{values.get('arch', 'megalodon')}-{values.get('preset', 'small')}"


def run_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from megalodon.training.trainer import train

    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(given_options(args, overrides))
    cfg = resolve_config(args, overrides, run_dir)
    try:
        result = train(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, device=args.device)
    except KeyboardInterrupt:  # before training started, or a third Ctrl-C: nothing half-written is kept
        print(f"megalodon train: interrupted; {run_dir} keeps its last complete checkpoint", file=sys.stderr)
        return 130
    if not result.finished:
        return 128 + result.stopped_by if result.stopped_by else 0
    print((run_dir / "summary.txt").read_text(), end="")
    print(f"validation bits/byte: {result.val_bpb:.4f}")
    return 0


def run_compare(args: argparse.Namespace, overrides: list[str]) -> int:
    """Megalodon and the matched Llama on the same tokens for the same number of steps, side by side."""
    from dataclasses import replace

    from megalodon.training.report import plot_curves, read_metrics
    from megalodon.training.trainer import train

    preset = given_options(args, overrides).get("preset", "small")
    out = Path(args.run_dir) if args.run_dir else Path("runs") / f"compare-{preset}"
    cfg = resolve_config(args, overrides, out / "megalodon")
    if cfg.max_steps == 0:
        raise ValueError("compare needs a fixed --max_steps, so that both models see the same tokens")
    results = {}
    for arch in ("megalodon", "llama"):
        try:
            results[arch] = train(replace(cfg, arch=arch), out / arch, resume=args.resume, overwrite=args.overwrite,
                                  device=args.device)
        except KeyboardInterrupt:
            print(f"megalodon compare: interrupted; {out / arch} keeps its last complete checkpoint", file=sys.stderr)
            return 130
        if not results[arch].finished:
            print(f"continue the comparison with: megalodon compare --resume --run-dir {out}")
            return 128 + results[arch].stopped_by if results[arch].stopped_by else 0
    curves = {arch: read_metrics(out / arch / "metrics.jsonl") for arch in results}
    plot_curves(curves, out / "compare.png", f"{cfg.preset} on {cfg.data}, seq_len {cfg.seq_len}")
    table = ["| model | parameters | tokens/s (training) | val loss | val bits/byte |", "|---|---|---|---|---|"]
    for arch, result in results.items():
        summary = json.loads((out / arch / "summary.json").read_text())
        table.append(f"| {arch} | {summary['parameters']:,} | {result.tokens_per_s:,.0f} | {result.val_loss:.4f} | "
                     f"{result.val_bpb:.4f} |")
    ratio = results["megalodon"].tokens_per_s / results["llama"].tokens_per_s
    text = ("\n".join(table) + f"\n\ntraining throughput ratio megalodon/llama: {ratio:.2f} (tokens per second of "
            "training steps; evaluation not counted)\n")
    atomic_write_text(out / "compare.md", text)
    print(text, end="")
    return 0


def add_parsers(sub) -> None:
    for name, handler, helptext in (("train", run_train, "train a model (Megalodon or the matched Llama)"),
                                    ("compare", run_compare, "train Megalodon and the matched Llama on the same "
                                                             "tokens and compare")):
        parser = sub.add_parser(name, help=helptext, allow_abbrev=False,
                                description=helptext + ". Any TrainConfig field can be set as "
                                "--field value (model fields as --model.field value).")
        parser.add_argument("--config", help="a TOML, YAML or JSON file of options")
        parser.add_argument("--run-dir", help="where checkpoints, metrics, plots and the model go")
        parser.add_argument("--resume", action="store_true",
                            help="continue the run in --run-dir exactly, with its saved options (options given "
                                 "beside it may change its length and logging, not what it computes)")
        parser.add_argument("--overwrite", action="store_true", help="replace what --run-dir holds")
        parser.add_argument("--quick", action="store_true", help="a tiny byte-level run that ends in under a minute")
        parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
        parser.set_defaults(run=handler, takes_overrides=True)
