"""Training a model on a task, and scoring it.

The training config is the trainer's own `TrainConfig` (optimizer, schedule, precision, seed), with the same
meaning: `seq_len` is the training window. A sequence example longer than the window is cut into consecutive
windows; with `stateful` Megalodon carries its state from one window to the next, detached (truncated BPTT, as
the trainer does on long documents), and without it every window starts from an empty state. The Llama always
trains on isolated windows. Classification examples are read whole (the head needs the final state).
The loss is the cross-entropy on the answer tokens only, averaged over the batch's answer tokens.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megalodon.baseline import Llama
from megalodon.data import IGNORE_INDEX
from megalodon.inference.generate import evaluation_mode
from megalodon.model import Megalodon
from megalodon.tasks.base import CLASSIFICATION, Example, Task, TaskBatch, collate, score
from megalodon.tasks.models import SequenceClassifier
from megalodon.training.compute import autocast
from megalodon.training.config import TrainConfig
from megalodon.training.optim import build_optimizer, lr_at

EVAL_BLOCK = 4096  # tokens per call when scoring long sequences: memory bounded by a block


def task_loss(model: nn.Module, batch: TaskBatch, task: Task, cfg: TrainConfig) -> float:
    """Backpropagate the mean answer loss of one batch (window by window); return that loss."""
    return float(_task_loss(model, batch, task, cfg, batch.input_ids.device))


def _task_loss(model: nn.Module, batch: TaskBatch, task: Task, cfg: TrainConfig, device) -> torch.Tensor:
    """task_loss, with the batch moved to `device` here and the loss left there (0-dim, float64): which windows
    hold answers is read from the batch's host copy, so that nothing waits for the device."""
    answers = batch.labels != IGNORE_INDEX
    on_device = batch.to(device)
    if task.kind == CLASSIFICATION:
        with autocast(cfg, device):
            loss = F.cross_entropy(model(on_device.input_ids, on_device.lengths), on_device.labels)
        loss.backward()
        return loss.detach().double()
    n_answers = max(int(answers.sum()), 1)
    stateful = cfg.stateful and isinstance(model, Megalodon)
    total, state = torch.zeros((), dtype=torch.float64, device=device), None
    for start in range(0, batch.input_ids.shape[1], cfg.seq_len):
        ids, labels = (t[:, start:start + cfg.seq_len] for t in (on_device.input_ids, on_device.labels))
        learn = bool(answers[:, start:start + cfg.seq_len].any())
        if not (learn or stateful):
            continue  # an isolated window without answers teaches nothing
        with torch.set_grad_enabled(learn), autocast(cfg, device):
            if stateful:
                logits, state = model(ids, state=state, return_state=True)
            else:
                logits = model(ids)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        if learn:
            (loss / n_answers).backward()
            total += loss.detach().double()
        if stateful:
            state = state.detach()
    return total / n_answers


def train_task(model: nn.Module, task: Task, cfg: TrainConfig, eval_examples: Sequence[Example] = (),
               log: Callable[[dict], None] | None = None, device: str = "cpu") -> list[dict]:
    """Train for cfg.max_steps on fresh train examples (step s draws examples s*B .. s*B+B-1 of the train
    split, so a run is reproducible from its seed). Every cfg.log_every steps a record goes to `log`; every
    cfg.eval_every steps (and at the end) the model is scored on `eval_examples`. Returns the records."""
    if cfg.max_steps < 1:
        raise ValueError("task training needs max_steps >= 1 (a time budget is not supported here)")
    torch.set_flush_denormal(True)  # fp32 slows several-fold on denormals on these CPUs
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    records, started = [], time.perf_counter()
    for step in range(cfg.max_steps):
        lr = lr_at(step, cfg, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = collate(task.examples("train", cfg.batch_size, cfg.seed, start=step * cfg.batch_size), task)
        loss = _task_loss(model, batch, task, cfg, torch.device(device))
        norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        loss, norm = torch.stack([loss, norm.double()]).tolist()  # the step's one wait for the device
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise RuntimeError(f"task training diverged at step {step + 1} (loss {loss:.4g}, gradient norm "
                               f"{norm:.4g}, lr {lr:.3g}): lower lr or raise warmup_steps")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        record = {"step": done, "loss": loss, "lr": lr, "elapsed_s": time.perf_counter() - started}
        if eval_examples and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps):
            record.update(evaluate_task(model, task, eval_examples, cfg.eval_batch_size))
        if done % cfg.log_every == 0 or done == cfg.max_steps or len(record) > 4:
            records.append(record)
            if log is not None:
                log(record)
    return records


def _argmax_stream(model: nn.Module, ids: torch.Tensor, window: int | None) -> torch.Tensor:
    """Greedy next-token ids (B, L) over a long batch, in blocks: Megalodon carries its state, the Llama its KV
    cache (full attention, or a sliding `window`)."""
    out, carried = [], None
    if isinstance(model, Megalodon):
        block = max(model.config.chunk_size, EVAL_BLOCK // model.config.chunk_size * model.config.chunk_size)
    else:
        block = EVAL_BLOCK
    for start in range(0, ids.shape[1], block):
        piece = ids[:, start:start + block]
        if isinstance(model, Megalodon):
            logits, carried = model(piece, state=carried, return_state=True)
        else:
            logits, carried = model(piece, past=carried, return_past=True, window=window)
        out.append(logits.argmax(-1))
    return torch.cat(out, dim=1)


def predict(model: nn.Module, task: Task, examples: Sequence[Example], batch_size: int = 8,
            window: int | None = None) -> list:
    """The model's answers: for sequence tasks the argmax at every answer position (teacher forcing), for
    classification the predicted class. window: the Llama's sliding attention window (None: full)."""
    if window is not None and not isinstance(model, Llama):
        raise ValueError("window applies to the Llama baseline only")
    device = next(model.parameters()).device
    answers: list = []
    with evaluation_mode(model):
        for first in range(0, len(examples), batch_size):
            group = examples[first:first + batch_size]
            batch = collate(group, task).to(device)
            if isinstance(model, SequenceClassifier):
                answers.extend(model(batch.input_ids, batch.lengths).argmax(-1).tolist())
                continue
            guesses = _argmax_stream(model, batch.input_ids, window).cpu().numpy()
            answers.extend(guesses[row, e.answers - 1] for row, e in enumerate(group))
    return answers


def evaluate_task(model: nn.Module, task: Task, examples: Sequence[Example], batch_size: int = 8,
                  window: int | None = None) -> dict:
    return score(task, predict(model, task, examples, batch_size, window), examples)


def answer_chance(task: Task) -> float:
    """Accuracy of guessing uniformly among the answer alphabet: the floor a table should show."""
    if task.kind == CLASSIFICATION:
        return 1.0 / task.num_classes
    alphabet = {"recall": "num_values", "copy": "num_data"}.get(task.name)
    return 0.1 if alphabet is None else 1.0 / getattr(task, alphabet)  # passkey: one digit in ten

