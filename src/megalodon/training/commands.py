"""`megalodon train` and `megalodon compare`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megalodon.training.config import TrainConfig, apply_overrides, read_config_file

QUICK = {"preset": "tiny", "tokenizer": "byte", "seq_len": 128, "batch_size": 4, "max_steps": 40, "eval_every": 20,
         "warmup_steps": 10, "checkpoint_every": 20, "sample_tokens": 60, "log_every": 5, "lr": 3e-3,
         "time_budget_min": 0.0}


def resolve_config(args: argparse.Namespace, overrides: list[str]) -> TrainConfig:
    values = read_config_file(args.config) if args.config else {}
    if args.quick:
        values = {**values, **QUICK}
    return TrainConfig.from_dict(apply_overrides(values, overrides))


def _default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.arch}-{cfg.preset}"


def run_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from megalodon.training.trainer import train

    cfg = resolve_config(args, overrides)
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(cfg)
    result = train(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, device=args.device)
    print((run_dir / "summary.txt").read_text(), end="")
    print(f"validation bits/byte: {result.val_bpb:.4f}")
    return 0


def run_compare(args: argparse.Namespace, overrides: list[str]) -> int:
    """Megalodon and the matched Llama on the same tokens for the same number of steps, side by side."""
    from dataclasses import replace

    from megalodon.training.report import plot_curves, read_metrics
    from megalodon.training.trainer import train

    cfg = resolve_config(args, overrides)
    if cfg.max_steps == 0:
        raise ValueError("compare needs a fixed --max_steps, so that both models see the same tokens")
    out = Path(args.run_dir) if args.run_dir else Path("runs") / f"compare-{cfg.preset}"
    results = {}
    for arch in ("megalodon", "llama"):
        run_cfg = replace(cfg, arch=arch)
        results[arch] = train(run_cfg, out / arch, resume=args.resume, overwrite=args.overwrite, device=args.device)
    curves = {arch: read_metrics(out / arch / "metrics.jsonl") for arch in results}
    plot_curves(curves, out / "compare.png", f"{cfg.preset} on {cfg.data}, seq_len {cfg.seq_len}")
    table = ["| model | parameters | tokens/s | val loss | val bits/byte |", "|---|---|---|---|---|"]
    for arch, result in results.items():
        summary = json.loads((out / arch / "summary.json").read_text())
        table.append(f"| {arch} | {summary['parameters']:,} | {result.tokens_per_s:,.0f} | {result.val_loss:.4f} | "
                     f"{result.val_bpb:.4f} |")
    ratio = results["megalodon"].tokens_per_s / results["llama"].tokens_per_s
    text = "\n".join(table) + f"\n\nthroughput ratio megalodon/llama: {ratio:.2f}\n"
    (out / "compare.md").write_text(text)
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
        parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir exactly")
        parser.add_argument("--overwrite", action="store_true", help="replace what --run-dir holds")
        parser.add_argument("--quick", action="store_true", help="a tiny byte-level run that ends in under a minute")
        parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
        parser.set_defaults(run=handler, takes_overrides=True)
