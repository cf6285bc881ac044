"""The loss-by-position plot: one curve per evaluated model, so Megalodon and the baseline share one figure."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from megalodon.inference.evaluate import EvalResult
from megalodon.optional import pyplot


def plot_loss_by_position(results: Sequence[EvalResult], path: str | Path, title: str | None = None) -> Path | None:
    """Mean loss per position bucket, each bucket drawn at its middle, on a log2 position axis.
    Without matplotlib: a warning that names the install step, and None."""
    path = Path(path)
    plt = pyplot(str(path))
    if plt is None:
        return None
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in results:
        points = [((b["start"] + b["end"]) / 2, b["mean_loss"]) for b in result.buckets() if b["tokens"]]
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=f"{result.label} (ppl {result.perplexity:.2f}, "
                                          f"{result.bits_per_byte:.3f} bits/byte)")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(_position_label))
    ax.set_xlabel("position in document (tokens), bucket middle")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(title or "Loss by position")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _position_label(value: float, _) -> str:
    """1024 -> 1K, 1048576 -> 1M: positions read at a glance."""
    for size, suffix in ((2**20, "M"), (2**10, "K")):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"
