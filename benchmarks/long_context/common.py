"""What the long-context experiments share: where results go, the run record every table cites, tables, plots.

Every experiment writes runs/long_context/<experiment>/results.json (the numbers, the command, the seeds, the
budget and the machine) and table.md; plots go to docs/images/. Each script skips work whose result file already
exists (a trained model, a finished evaluation, an experiment run with the same options), so an interrupted
suite resumes where it stopped (delete a result to redo it).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RUNS = Path(os.environ.get("LONG_CONTEXT_RUNS", ROOT / "runs" / "long_context"))
IMAGES = Path(os.environ.get("LONG_CONTEXT_IMAGES", ROOT / "docs" / "images"))
DATA = os.environ.get("LONG_CONTEXT_DATA", str(ROOT / "data"))


def setup(threads: int = 0) -> None:
    torch.set_flush_denormal(True)  # fp32 slows several-fold on denormals on these CPUs
    if threads:
        torch.set_num_threads(threads)


def machine() -> dict:
    """The facts a timing needs beside it: CPU, threads, AMX, load when the experiment started, the commit."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    commit = os.environ.get("MEGALODON_CODE_COMMIT", "")  # set when the code runs from a snapshot of a commit
    if not commit:
        try:
            commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
        except OSError:
            pass
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "amx_bf16": "amx_bf16" in flags, "load_average": os.getloadavg(), "torch": torch.__version__,
            "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M")}


def command() -> str:
    return " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def already_done(experiment: str) -> bool:
    """True, after printing its table, when this experiment already finished with the same options (threads
    aside): a resumed suite then skips its evaluations too, not only its training."""
    saved = load_json(RUNS / experiment / "results.json")
    if saved is None or _options(saved.get("command", "")) != _options(command()):
        return False
    print((RUNS / experiment / "table.md").read_text())
    return True


def _options(cmd: str) -> list[str]:
    words = cmd.split()
    return [w for i, w in enumerate(words) if w != "--threads" and (i == 0 or words[i - 1] != "--threads")]


def save_results(experiment: str, results: dict, table: str) -> Path:
    out = RUNS / experiment
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(table)
    print(table)
    return out


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def task_model(out_dir: Path, task, cfg, ema: str = "complex", eval_examples=()):
    """The task model trained in out_dir, training it first if it is not there; returns (model, record) where
    the record holds the training seconds, steps and the last logged loss."""
    from megalodon.tasks import build_task_model, load_task_model, save_task_model, train_task

    if (out_dir / "task.json").is_file():
        model, _, _, meta = load_task_model(out_dir)
        return model, meta["results"]
    model = build_task_model(task, cfg, ema)
    started = time.perf_counter()
    records = train_task(model, task, cfg, eval_examples, log=lambda r: print(out_dir.name, r, flush=True))
    record = {**records[-1], "train_s": time.perf_counter() - started, "parameters":
              sum(p.numel() for p in model.parameters()), "load_average_after": os.getloadavg()}
    save_task_model(out_dir, model, task, cfg, ema, results=record)
    return model.eval(), record
