"""End-of-run artifacts: the loss curves as a PNG and a short text summary."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a metrics.jsonl file."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def plot_curves(curves: dict[str, tuple[list[dict], list[dict]]], out: Path, title: str) -> None:
    """Train and validation loss against tokens seen, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def write_report(run_dir: Path, cfg, model, sample: str, padding_fraction: float) -> dict:
    train, val = read_metrics(run_dir / "metrics.jsonl")
    plot_curves({cfg.arch: (train, val)}, run_dir / "loss.png", f"{cfg.arch} / {cfg.preset} on {cfg.data}")
    last_val = val[-1] if val else {"val_loss": float("nan"), "val_ppl": float("nan"), "val_bpb": float("nan")}
    rate = train[-1]["tokens_per_s"] if train else 0.0
    final = {**last_val, "tokens_per_s": rate, "steps": train[-1]["step"] if train else 0,
             "tokens": train[-1]["tokens"] if train else 0, "parameters": model.num_parameters(),
             "padding_fraction": padding_fraction}
    lines = [
        f"run        {run_dir}",
        f"model      {cfg.arch} ({cfg.preset}), {final['parameters']:,} parameters",
        f"data       {cfg.data}, seq_len {cfg.seq_len}, batch {cfg.batch_size}, padding {padding_fraction:.1%}",
        f"trained    {final['steps']} steps, {final['tokens']:,} tokens at {rate:,.0f} tokens/s",
        f"validation loss {last_val['val_loss']:.4f}, perplexity {last_val['val_ppl']:.2f}, "
        f"bits/byte {last_val['val_bpb']:.4f}",
        "sample:",
        sample,
    ]
    (run_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(final, indent=2))
    return final
