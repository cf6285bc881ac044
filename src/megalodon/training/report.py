"""What a run leaves to read: metrics.jsonl (strict JSON lines), the loss curves as a PNG, a short summary, and
TensorBoard logs when asked for."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from megalodon.optional import pyplot
from megalodon.training.run_dir import atomic_write_text


def strict_json(record: dict, **kwargs) -> str:
    """JSON that strict readers accept: a non-finite number is written as null, never as NaN."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False, **kwargs)


@dataclass
class RunResult:
    """What train() returns: the run's final figures, or how far it got when a signal stopped it."""
    run_dir: Path
    steps: int
    val_loss: float
    val_bpb: float
    tokens_per_s: float  # tokens per second of training steps (evaluation and checkpoints not counted)
    sample: str
    finished: bool = True
    stopped_by: int | None = None  # the signal (SIGINT, SIGTERM) that stopped the run early


def parse_metrics(path: Path, torn_tail_ok: bool = False) -> list[tuple[str, dict]]:
    """(line, record) pairs of a metrics.jsonl file. A line that is not a JSON record is an error naming the file
    and line, except a torn last line (a kill during an append) when torn_tail_ok: it is dropped."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    pairs = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with a step")
        except ValueError as err:
            if torn_tail_ok and number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not a metrics record ({err}); a write was cut short or the "
                             "file was edited. Delete or fix that line") from None
        pairs.append((line, record))
    return pairs


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step` (those logged before the checkpoint a run resumes from), so that the log
    reads as one run. Replaced atomically: a kill during the rewrite leaves the old log whole."""
    if path.is_file():
        kept = [line for line, record in parse_metrics(path, torn_tail_ok=True) if record["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a metrics.jsonl file."""
    records = [record for _, record in parse_metrics(path)]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def plot_curves(curves: dict[str, tuple[list[dict], list[dict]]], out: Path, title: str) -> None:
    """Train and validation loss against tokens seen, one colour per run (skipped, with a warning, without
    matplotlib)."""
    plt = pyplot(str(out))
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, (train, val)) in enumerate(curves.items()):
        colour = f"C{i}"
        tokens_per_step = train[-1]["tokens"] / train[-1]["step"] if train else 0
        if train:
            ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], color=colour, alpha=0.35,
                    label=f"{label} train")
        if val:
            ax.plot([r["step"] * tokens_per_step for r in val], [r["val_loss"] for r in val], "o-", color=colour,
                    label=f"{label} val")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_report(run_dir: Path, cfg, model, sample: str, padding_fraction: float, timing: dict,
                 precision: dict) -> dict:
    """summary.txt, summary.json and loss.png of a finished run. timing: tokens, train_s (the training steps
    alone) and wall_s (the run's wall-clock time, evaluations and checkpoints included); precision: what the run
    computed in ("precision": fp32, bf16 or fp16; for fp16 also its final loss_scale and skipped_steps)."""
    train, val = read_metrics(run_dir / "metrics.jsonl")
    plot_curves({cfg.arch: (train, val)}, run_dir / "loss.png", f"{cfg.arch} / {_size(cfg)} on {cfg.data}")
    last_val = val[-1] if val else {"val_loss": float("nan"), "val_ppl": float("nan"), "val_bpb": float("nan")}
    rate = timing["tokens"] / timing["train_s"] if timing["train_s"] > 0 else 0.0
    final = {**last_val, "tokens_per_s": rate, "steps": train[-1]["step"] if train else 0, **timing,
             "parameters": model.num_parameters(), "padding_fraction": padding_fraction, **precision}
    scaling = f", loss scale {precision['loss_scale']:g}, {precision['skipped_steps']} steps skipped" \
        if "loss_scale" in precision else ""
    lines = [
        f"run        {run_dir}",
        f"model      {cfg.arch} ({_size(cfg)}), {final['parameters']:,} parameters",
        f"data       {cfg.data}, seq_len {cfg.seq_len}, batch {cfg.batch_size}, padding {padding_fraction:.1%}",
        f"trained    {final['steps']} steps, {timing['tokens']:,} tokens at {rate:,.0f} tokens/s of training time",
        f"precision  {precision['precision']}{' autocast' if precision['precision'] != 'fp32' else ''}{scaling}",
        f"time       {timing['train_s']:,.1f} s training, {timing['wall_s']:,.1f} s wall-clock (evaluations and "
        "checkpoints included)",
        f"validation loss {last_val['val_loss']:.4f}, perplexity {last_val['val_ppl']:.2f}, "
        f"bits/byte {last_val['val_bpb']:.4f}",
        "sample:",
        sample,
    ]
    atomic_write_text(run_dir / "summary.txt", "\n".join(lines) + "\n")
    atomic_write_text(run_dir / "summary.json", strict_json(final, indent=2))
    return final


def tensorboard_writer():
    """torch's SummaryWriter class, or the error that names the missing package (checked before a run starts)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard true needs the tensorboard package: pip install tensorboard "
                         "(or drop --tensorboard)") from None
    return SummaryWriter


def _size(cfg) -> str:
    return f"from {cfg.init_from}" if cfg.init_from else cfg.preset
