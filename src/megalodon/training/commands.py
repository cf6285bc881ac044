"""`megalodon train` and `megalodon compare`: every TrainConfig field is an option, listed by --help."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

from megalodon.cli_options import add_device_option, field_docs
from megalodon.config import MegalodonConfig
from megalodon.training.config import TrainConfig, parse_value, read_config_file
from megalodon.training.run_dir import atomic_write_text, saved_options

# A tiny byte-level run: 40 steps, and each evaluation reads 4096 validation tokens, not the whole split.
QUICK = {"preset": "tiny", "tokenizer": "byte", "seq_len": 128, "batch_size": 4, "max_steps": 40, "eval_every": 20,
         "warmup_steps": 10, "checkpoint_every": 20, "sample_tokens": 60, "log_every": 5, "lr": 3e-3,
         "time_budget_min": 0.0, "eval_tokens": 4096}
MODEL_PREFIX = "model."


def given_options(args: argparse.Namespace) -> dict:
    """The options the user gave: a config file, --quick, then the --field and --model.field options."""
    values = read_config_file(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and k != "model"}
    if args.quick:  # a quick fine-tune keeps the model and tokenizer it starts from
        keeps = ("preset", "tokenizer") if flags.get("init_from") or values.get("init_from") else ()
        values = {**values, **{k: v for k, v in QUICK.items() if k not in keeps}}
    model_flags = {k[len(MODEL_PREFIX):]: v for k, v in vars(args).items() if k.startswith(MODEL_PREFIX)}
    values = {**values, **flags}
    if model_flags:
        model = values.get("model", {})
        if not isinstance(model, dict):
            raise ValueError(f"--model.* options need the config's model to be a table, got {model!r}")
        values["model"] = {**model, **model_flags}
    return values


def resolve_config(args: argparse.Namespace, run_dir: Path | None = None) -> TrainConfig:
    """The run's config. With --resume and a run in run_dir, its saved options with the given ones on top (the
    trainer refuses those that would change what the run computes), so that `--resume --run-dir DIR` alone
    continues the run."""
    given = given_options(args)
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


def print_config(cfg: TrainConfig) -> int:
    """--print_config: the resolved config as JSON (what train_config.json will hold; --config reads it back)."""
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def _default_run_dir(values: dict) -> Path:
    return Path("runs") / f"{values.get('arch', 'megalodon')}-{values.get('preset', 'small')}"


def run_train(args: argparse.Namespace) -> int:
    from megalodon.training.trainer import train

    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(given_options(args))
    cfg = resolve_config(args, run_dir)
    if args.print_config:
        return print_config(cfg)
    if cfg.nproc > 1 and "LOCAL_RANK" not in os.environ:  # not yet under torchrun: become its agent
        from megalodon.parallel.launch import launch_train

        return launch_train(cfg.nproc, cfg.to_dict(), run_dir, args.resume, args.overwrite, args.device)
    try:
        result = train(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, device=args.device)
    except KeyboardInterrupt:  # before training started, or a third Ctrl-C: nothing half-written is kept
        print(f"megalodon train: interrupted; {run_dir} keeps its last complete checkpoint", file=sys.stderr)
        return 130
    if not result.finished:
        return 128 + result.stopped_by if result.stopped_by else 0
    if os.environ.get("RANK", "0") != "0":  # rank 0 reports for a run on several ranks
        return 0
    print((run_dir / "summary.txt").read_text(), end="")
    print(f"validation bits/byte: {result.val_bpb:.4f}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """Megalodon and the matched Llama on the same tokens for the same number of steps, side by side."""
    from dataclasses import replace

    from megalodon.training.report import plot_curves, read_metrics
    from megalodon.training.trainer import train

    preset = given_options(args).get("preset", "small")
    out = Path(args.run_dir) if args.run_dir else Path("runs") / f"compare-{preset}"
    cfg = resolve_config(args, out / "megalodon")
    if args.print_config:
        return print_config(cfg)
    if cfg.max_steps == 0:
        raise ValueError("compare needs a fixed --max_steps, so that both models see the same tokens")
    if cfg.nproc > 1:
        raise ValueError("compare runs in one process; drop --nproc (train each model with megalodon train --nproc)")
    if cfg.init_from:
        raise ValueError("compare trains both models from scratch; drop --init_from (megalodon train takes it)")
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
        usage = (f"megalodon {name} [--config FILE] [--quick] [--run-dir DIR] [--resume] [--print-config] "
                 "[--FIELD VALUE ...] [--model.FIELD VALUE ...]")
        parser = sub.add_parser(name, help=helptext, usage=usage, description=f"{helptext}. Options apply in this "
                                "order: --config, then --quick, then each --field.")
        parser.add_argument("--config", help="a TOML, YAML or JSON file of options, or a built-in config's name "
                                             "(demo)")
        parser.add_argument("--run-dir", help="where checkpoints, metrics, plots and the model go (default: "
                                              "runs/ARCH-PRESET, or runs/compare-PRESET)")
        parser.add_argument("--resume", action="store_true",
                            help="continue the run in --run-dir exactly, with its saved options (options given "
                                 "beside it may change its length and logging, not what it computes)")
        parser.add_argument("--overwrite", action="store_true", help="replace what --run-dir holds")
        parser.add_argument("--quick", action="store_true",
                            help="a tiny byte-level run that ends in under a minute: " + _quick_text())
        parser.add_argument("--print-config", action="store_true",
                            help="print the resolved config as JSON and exit (it is a valid --config file)")
        add_device_option(parser)
        add_config_options(parser)
        parser.set_defaults(run=handler)


def _quick_text() -> str:
    return ", ".join(f"{key} {value}" for key, value in QUICK.items()).replace("%", "%%")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """An option per TrainConfig field (`--seq-len`) and per model field (`--model.chunk-size`), grouped by the
    dataclass's section comments, with its type, default and help line. An option not given stays out of the
    namespace, so that a config file's value is kept."""
    helps, sections = field_docs(TrainConfig)
    groups = {}  # section comment -> argument group
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        section = sections.get(f.name) or "options"
        if section not in groups:
            groups[section] = parser.add_argument_group(f"training: {section}")
        _add_field(groups[section], f.name, hints[f.name], f.default, helps.get(f.name, ""), f"default: {f.default!r}")
    group = parser.add_argument_group("model fields (override the preset's; a [model] table in a config file)")
    helps, _ = field_docs(MegalodonConfig)
    hints = typing.get_type_hints(MegalodonConfig)
    for f in dataclasses.fields(MegalodonConfig):
        like = 0 if f.default is dataclasses.MISSING else f.default
        _add_field(group, MODEL_PREFIX + f.name, hints[f.name], like, helps.get(f.name, ""), "default: the preset's")


def _add_field(group, name: str, hint, like, helptext: str, default_text: str) -> None:
    def parse(raw: str):
        try:
            return parse_value(raw, like, name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    text = f"{helptext} ({default_text})".replace("%", "%%")
    option = "--" + name.replace("_", "-")
    if hint is bool:  # --compile alone means true
        group.add_argument(option, dest=name, type=parse, nargs="?", const=True, default=argparse.SUPPRESS,
                           metavar="BOOL", help=text)
    else:
        group.add_argument(option, dest=name, type=parse, default=argparse.SUPPRESS, metavar=_metavar(hint),
                           help=text)


def _metavar(hint) -> str:
    if isinstance(hint, type):
        return hint.__name__.upper()
    return "|".join("none" if arg is type(None) else arg.__name__.upper() for arg in typing.get_args(hint))
