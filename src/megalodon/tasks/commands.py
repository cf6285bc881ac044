"""`megalodon tasks NAME --train | --eval DIR | --show`: train a tiny model on a task, score one, or print examples.

    megalodon tasks recall --train --out runs/tasks/recall                  # the recipe, in minutes on CPU
    megalodon tasks recall --train --out runs/tasks/ema --ema real --max_steps 200 --model.chunk_size 64
    megalodon tasks recall --eval runs/tasks/recall -o gap=256 --examples 500
    megalodon tasks listops --show -o max_depth=2 --examples 2

Training options are the trainer's (`--field value`, `--model.field value`); task options are `-o key=value`
(a range is `key=low:high`, drawn per example).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megalodon.tasks.registry import TASKS, make_task, parse_option


def add_parser(sub) -> None:
    p = sub.add_parser("tasks", help="long-context tasks: train a tiny model on one, score a model, show examples",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    p.add_argument("task", choices=sorted(TASKS), help="which task")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--train", action="store_true", help="train the task's recipe (with overrides) into --out")
    action.add_argument("--eval", metavar="DIR", help="score the task model in DIR on fresh test examples")
    action.add_argument("--show", action="store_true",
                        help="print the recipe's test examples (with -o options) as token ids and answers")
    p.add_argument("--out", metavar="DIR", help="--train: where task.json and model.safetensors go")
    p.add_argument("-o", "--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option, e.g. gap=256 or gap=0:96 (repeatable); see each task's options with --show")
    p.add_argument("--ema", choices=["complex", "real"], default="complex",
                   help="--train: the CEMA, or the real-valued EMA ablation (every angle pinned at 0)")
    p.add_argument("--examples", type=int, default=None, help="test examples (--eval: 200, --show: 2)")
    p.add_argument("--seed", type=int, default=0, help="--eval/--show: seed of the test examples")
    p.add_argument("--window", type=int, default=None, help="--eval: the Llama's sliding attention window")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when present, else CPU), cpu or cuda")
    p.set_defaults(run=run_tasks, takes_overrides=True)


def _task_options(args) -> dict:
    return dict(parse_option(text) for text in args.task_option)


def run_tasks(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.examples is not None and args.examples < 1:
        raise ValueError(f"--examples must be >= 1, got {args.examples}")
    if overrides and not args.train:
        raise ValueError(f"training options ({' '.join(overrides)}) apply to --train only")
    if args.train:
        return _train(args, overrides)
    if args.eval:
        return _evaluate(args)
    return _show(args)


def _train(args, overrides: list[str]) -> int:
    from megalodon.tasks.models import build_task_model, save_task_model
    from megalodon.tasks.recipes import held_out_task, recipe
    from megalodon.tasks.train import answer_chance, train_task

    if not args.out:
        raise ValueError("--train needs --out DIR (where the task model is written)")
    options = _task_options(args)
    task, cfg = recipe(args.task, options, overrides)
    test = held_out_task(args.task, options).examples("test", args.examples or 200, args.seed)
    model = build_task_model(task, cfg, args.ema)
    print(f"{args.task}: {sum(p.numel() for p in model.parameters()):,} parameters ({cfg.arch}, {args.ema} EMA), "
          f"{cfg.max_steps} steps of {cfg.batch_size}; chance {answer_chance(task):.3f}")
    records = train_task(model, task, cfg, test, log=lambda r: print(_format(r), flush=True), device=args.device)
    save_task_model(args.out, model, task, cfg, args.ema, results=records[-1])
    print(f"wrote {args.out}")
    _write_json(args.json, {"task": args.task, "settings": task.settings(), "records": records})
    return 0


def _evaluate(args) -> int:
    from megalodon.tasks.models import load_task_model
    from megalodon.tasks.train import answer_chance, evaluate_task

    model, trained, cfg, _ = load_task_model(args.eval)
    if trained.name != args.task:
        raise ValueError(f"{args.eval} holds a model trained on {trained.name!r}, not {args.task!r}")
    task = make_task(args.task, **{**trained.settings(), **_task_options(args)})
    model.to(args.device)
    result = evaluate_task(model, task, task.examples("test", args.examples or 200, args.seed),
                           cfg.eval_batch_size, args.window)
    result = {**result, "chance": answer_chance(task), "settings": task.settings()}
    print(_format(result))
    _write_json(args.json, result)
    return 0


def _show(args) -> int:
    from megalodon.tasks.recipes import held_out_task

    task = held_out_task(args.task, _task_options(args))
    print(f"{args.task} options: {task.settings()}; vocabulary {task.vocab_size}")
    for example in task.examples("test", args.examples or 2, args.seed):
        answer = example.label if example.answers.size == 0 else example.answer_tokens().tolist()
        print(f"{len(example.tokens)} tokens {example.info}: {example.tokens.tolist()[:64]}"
              f"{' ...' if len(example.tokens) > 64 else ''} -> answer {answer}")
    return 0


def _format(record: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())


def _write_json(path: str | None, value: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(value, indent=2) + "\n")
