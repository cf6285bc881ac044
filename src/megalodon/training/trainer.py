"""The training loop: stateful windows, bf16 (or fp16) autocast, accumulation, evaluation, exact resume; on one
process or on several (torchrun: FSDP2 or DDP, chunk parallelism; see megalodon.parallel.runtime)."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from megalodon.checkpoint import save_pretrained
from megalodon.data import IGNORE_INDEX, Batch, PackedBatcher
from megalodon.out_of_memory import EVALUATION_FIXES, explain_out_of_memory, training_step_fixes, weights_fixes
from megalodon.progress import progress_bar
from megalodon.parallel.runtime import Ranks, rank_device
from megalodon.training.checkpoint import list_checkpoints, save_checkpoint, verify_latest
from megalodon.training.compute import autocast, autocast_dtype, carried, evaluate, forward_loss, graph_launches, \
    precision_name, precision_notes, sample_text, uses_cuda_graphs
from megalodon.training.config import TrainConfig
from megalodon.training.cuda_graphs import GraphedForwardLoss
from megalodon.training.data import open_splits, prepare_data
from megalodon.training.loss_scaling import LossScaling
from megalodon.training.models import (apply_activation_checkpointing, build_model, chunk_size_of,
                                       load_initial_weights)
from megalodon.training.optim import build_optimizer, changed_length, lr_at
from megalodon.training.report import RunResult, strict_json, tensorboard_writer, truncate_metrics, write_report
from megalodon.training.run_dir import RunDirLock, atomic_write_text, prepare_run_dir, saved_options
from megalodon.training.signals import StopSignals
from megalodon.training.streams import global_streams, micro_batch_streams
from megalodon.training.time_budget import TimeBudget

logger = logging.getLogger(__name__)


class Trainer:
    """One training run: built from a config and a run directory, resumable from its checkpoints.

    It holds an exclusive lock on the run directory from construction to close() (`with Trainer(...)` closes).
    On several ranks every rank builds one; rank 0 holds the lock and alone logs, samples and writes files."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
                 device: str = "cpu", progress: bool = True):
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        # a missing package is named before any work
        self._summary_writer = tensorboard_writer() if cfg.tensorboard else None
        self.device = rank_device(torch.device(device))
        self.tensorboard = self.lock = None
        self.ranks = Ranks.for_run(cfg.parallel, cfg.chunk_parallel, chunk_size_of(cfg), self.device,
                                   cfg.collective_timeout_min)
        self.main = self.ranks is None or self.ranks.main
        if not self.main:
            logging.getLogger("megalodon").setLevel(logging.ERROR)  # rank 0 speaks for the run
        try:
            self._on_main(self._lock)  # before --overwrite may delete anything
            self._setup(resume, overwrite)
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        self.lock = RunDirLock(self.run_dir).acquire()

    def _on_main(self, fn):
        """fn() on rank 0 only; its result, or its error, on every rank."""
        return fn() if self.ranks is None else self.ranks.on_main(fn)

    def _setup(self, resume: bool, overwrite: bool) -> None:
        cfg = self.cfg
        self.stateful = cfg.stateful and cfg.arch == "megalodon"
        self.graphed = None
        if uses_cuda_graphs(cfg, self.device, self.ranks is not None):  # refused before any work
            self.graphed = GraphedForwardLoss.for_run(self.device, self.ranks is not None, forward_loss,
                                                      autocast_dtype(cfg, self.device), self.stateful)
        self._on_main(lambda: prepare_run_dir(self.run_dir, cfg.to_dict(), resume, overwrite))
        torch.set_flush_denormal(True)  # fp32 training slows 3-4x on denormals on these CPUs
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)

        store_dir, self.tokenizer = prepare_data(cfg)
        train_store, self.val_store = open_splits(cfg, store_dir, self.tokenizer)
        if train_store.vocab_size != self.tokenizer.vocab_size:
            raise ValueError(f"the token store's vocab ({train_store.vocab_size}) does not match the tokenizer's "
                             f"({self.tokenizer.vocab_size}); delete {store_dir} to rebuild it")
        stores = train_store.meta if not cfg.val_data else [train_store.meta, self.val_store.meta]
        self.data_fingerprint = hashlib.sha256(json.dumps(stores, sort_keys=True).encode()).hexdigest()
        self.chunk = chunk_size_of(cfg)
        tok = self.tokenizer
        self.pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
        self.model = build_model(cfg, tok.vocab_size)
        if cfg.init_from:  # a resumed run's checkpoint then replaces them
            load_initial_weights(self.model, cfg)
        with explain_out_of_memory(f"placing the model on {self.device}",
                                   lambda: weights_fixes(self.model.num_parameters(), optimizer=False)):
            self.model.to(self.device)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if cfg.compile:  # after checkpointing (each block's graph holds its recomputation), before wrapping
            self.model.compile_blocks(**({} if cfg.compile_mode == "default" else {"mode": cfg.compile_mode}))
        self.runner = self.model  # what a training step calls: the model, or DDP's wrapper of it
        if self.ranks is not None:
            self.ranks.check_shapes(cfg.batch_size, cfg.grad_accum, cfg.seq_len)
            self.runner = self.ranks.wrap(self.model)
        self.optimizer = build_optimizer(self.model, cfg)
        self.loss_scaling = LossScaling(autocast_dtype(cfg, self.device) == torch.float16, self.device)
        for note in precision_notes(cfg, self.device):
            logger.warning(note)
        # Every rank reads the same global batch and keeps its own rows (Ranks.rows): the cursor is global.
        self.batcher = PackedBatcher(train_store, cfg.batch_size, cfg.seq_len, self.chunk, cfg.seed, self.pad_id)
        self.streams: list = [None] * cfg.grad_accum  # carried state of each micro-batch's rows
        self.step, self.max_steps, self.tokens, self.train_time, elapsed = 0, cfg.max_steps, 0, 0.0, 0.0
        self.restart: tuple[int, float] | None = None  # where the lr decay restarted after a change of length
        self._stop_signal = 0  # on several ranks: the signal any rank received
        if resume:
            elapsed = self._resume()
        self._on_main(lambda: self._write_config(tok))
        self.start_time = time.perf_counter() - elapsed
        if self._summary_writer is not None:
            self._on_main(lambda: setattr(self, "tensorboard", self._summary_writer(str(self.run_dir / "tensorboard"))))

    def _write_config(self, tokenizer) -> None:
        atomic_write_text(self.run_dir / "train_config.json", json.dumps(self.cfg.to_dict(), indent=2))
        tokenizer.save(self.run_dir / "model")

    def close(self) -> None:
        if getattr(self, "graphed", None) is not None:  # its graphs' memory: torch's objects that only gc frees
            self.graphed = None
            gc.collect()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.lock is not None:
            self.lock.release()
        if self.ranks is not None:
            self.ranks.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _resume(self) -> float:
        cfg = self.cfg
        metrics = self.run_dir / "metrics.jsonl"
        checkpoints = list_checkpoints(self.run_dir)
        if not checkpoints:
            cleared = " (the metrics it logged are cleared)" if metrics.exists() else ""
            logger.info("%s has no checkpoint yet: starting from step 0%s", self.run_dir, cleared)
            self._on_main(lambda: metrics.unlink(missing_ok=True))
            return 0.0
        previous = saved_options(self.run_dir)
        latest = checkpoints[-1]
        self._on_main(lambda: verify_latest(checkpoints))
        # torch.distributed.checkpoint (and the FSDP and DTensor it brings) is imported only where it is used:
        # seconds of every fresh single-process run's start otherwise.
        from megalodon.training.dist_checkpoint import load_any

        saved, streams = load_any(latest, self.model, self.optimizer, self.ranks is not None)
        # Checkpoints written before these keys existed lack them: no data check, wall-clock as training time.
        if saved.get("data", self.data_fingerprint) != self.data_fingerprint:
            raise ValueError(f"the training data changed since {latest} was written ({self.cfg.data}): resuming "
                             "would not continue the same run. Restore the files, or start a new run")
        if streams is not None and self.stateful:
            self.streams = micro_batch_streams(streams, cfg.batch_size, cfg.grad_accum, self.ranks, self.device, latest)
        self.batcher.load_state_dict(saved["batcher"])
        self.step, self.max_steps, self.tokens = saved["step"], saved["max_steps"], saved["tokens"]
        self.train_time = saved.get("train_s", saved["elapsed"])
        self.restart = tuple(saved["lr_restart"]) if saved.get("lr_restart") else None
        self.loss_scaling.load_state_dict(saved.get("loss_scaling", {}))
        self._on_main(lambda: truncate_metrics(metrics, self.step))
        self._change_length(previous.get("time_budget_min"))
        return saved["elapsed"]

    def _change_length(self, saved_budget: float | None) -> None:
        """Apply a --max_steps given on resume that differs from the run's length (optim.changed_length)."""
        old = self.max_steps
        change = changed_length(self.cfg, self.step, old, self.restart, saved_budget)
        if change is not None:
            self.max_steps, self.restart, plan = change
            verb = "extending" if self.max_steps > (old or 0) else "shortening"
            logger.info("%s the run from %s to %s steps: %s", verb, old or "its time budget", self.max_steps, plan)
            self.log({"step": self.step, "event": f"max_steps {old} -> {self.max_steps}", "lr_restart": self.restart})

    @property
    def elapsed(self) -> float:
        """Wall-clock seconds of the run so far, evaluations and checkpoints included."""
        return time.perf_counter() - self.start_time

    def log(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(strict_json(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def checkpoint(self) -> None:
        state = {"max_steps": self.max_steps, "lr_restart": self.restart, "elapsed": self.elapsed,
                 "train_s": self.train_time, "tokens": self.tokens, "batcher": self.batcher.state_dict(),
                 "data": self.data_fingerprint, "loss_scaling": self.loss_scaling.state_dict()}
        if self.ranks is None:
            save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state,
                            self.streams if self.stateful else [], self.cfg.keep_checkpoints)
        else:
            from megalodon.training.dist_checkpoint import save_sharded

            save_sharded(self.run_dir, self.step, self.model, self.optimizer, state,
                         global_streams(self.streams, self.ranks), self.cfg.keep_checkpoints, self.ranks,
                         self.tokenizer)

    def train_step(self) -> float:
        """One optimizer step over batch_size rows in grad_accum micro-batches; returns the mean loss.
        A non-finite loss or gradient stops the run before the optimizer touches the weights; in fp16 an overflowed
        gradient skips the step and halves the loss scale instead (loss_scaling.py)."""
        started = time.perf_counter()
        cfg = self.cfg
        batch = self.batcher.next_batch()
        if self.ranks is not None:  # each rank its own dropout masks
            self.ranks.seed_step(cfg.seed, self.step)
        n_labels = max(int((batch.labels != IGNORE_INDEX).sum()), 1)  # over the global batch, on every rank
        mine = (batch if self.ranks is None else self.ranks.rows(batch)).to(self.device)
        micro = mine.input_ids.shape[0] // cfg.grad_accum
        # FSDP and DDP average the ranks' gradients: scale up so that the result is the global token mean's
        scale = (1 if self.ranks is None else self.ranks.world) / n_labels
        lr = lr_at(self.step, cfg, self.max_steps or 10 ** 9, self.restart)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # reading each loss would wait for the GPU
        with self._out_of_memory(f"in training step {self.step + 1}",
                                 lambda: training_step_fixes(cfg.activation_checkpointing),
                                 f"{micro} x {mine.input_ids.shape[1]} tokens a micro-batch"):
            for m in range(cfg.grad_accum):
                self._forward_backward(mine, slice(m * micro, (m + 1) * micro), m, scale, total)
        self.loss_scaling.unscale_(self.optimizer)
        # max_norm inf only measures: the norm is what tells a diverging run apart (and an fp16 overflow)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        read = [total, norm.double()] + ([self.loss_scaling.current(total)] if self.loss_scaling.enabled else [])
        total, self.grad_norm, *scale = torch.stack(read).tolist()  # the step's one wait for the GPU
        self.loss_scale = scale[0] if scale else 1.0
        if self.ranks is not None:
            total = self.ranks.sum([total])[0]
        overflowed = self.loss_scaling.enabled and math.isfinite(total) and not math.isfinite(self.grad_norm)
        if not overflowed and not (math.isfinite(total) and math.isfinite(self.grad_norm)):
            raise RuntimeError(
                f"training diverged at step {self.step + 1}: the loss is {total / n_labels:.4g} and the gradient "
                f"norm {self.grad_norm:.4g} (learning rate {lr:.3g}). {self._nothing_lost()}. Lower --lr or raise "
                f"--warmup_steps, and start again{self.loss_scaling.hint(loss_finite=math.isfinite(total))}")
        if overflowed:
            logger.debug("step %d: the gradients overflowed fp16 at a loss scale of %g; skipped", self.step + 1,
                         self.loss_scale)
            self.loss_scaling.skip(self.step + 1, self.loss_scale)
        else:
            with self._out_of_memory("in the optimizer's step",
                                     lambda: weights_fixes(self.model.num_parameters(), optimizer=True)):
                self.optimizer.step()
            self.loss_scaling.stepped()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += batch.input_ids.numel()
        self.train_time += time.perf_counter() - started
        return total / n_labels

    def _nothing_lost(self) -> str:
        latest = list_checkpoints(self.run_dir)[-1:]
        return ("Nothing of this step was saved; " +
                (f"the last checkpoint is {latest[0]}" if latest else "no checkpoint was written yet"))

    def _out_of_memory(self, doing: str, fixes: Callable[[], str], detail: str | None = None):
        """An out-of-memory error inside a step, explained: where, on which device, what needs less (fixes(),
        asked only then), what was kept."""
        where = f"{doing} on {self.device}" + (f", {detail}" if detail else "")
        return explain_out_of_memory(where, lambda: f"{fixes()}. {self._nothing_lost()}")

    def _forward_backward(self, mine: Batch, rows: slice, m: int, scale: float, total: torch.Tensor) -> None:
        """Micro-batch m (these rows of the step's batch): forward and backward, its loss added into `total` (on
        the device), its state carried to the next step."""
        part = Batch(mine.input_ids[rows], mine.labels[rows], mine.doc_start[rows], mine.continues[rows])
        replayed = self.graphed is not None and self.graphed.ready(self.streams[m]) and self._replayed(part, m)
        if replayed:
            loss, new_state = replayed
        else:
            with autocast(self.cfg, self.device), graph_launches(self.cfg):
                loss, new_state = forward_loss(self.runner, part, self.streams[m], self.stateful)
        self.loss_scaling.scale(loss * scale).backward()  # every label weighs the same across micro-batches and ranks
        total += loss.detach().double()
        if self.stateful:  # truncated BPTT: the state goes on, its graph does not
            new_state = carried(new_state, self.cfg)
            self.streams[m] = new_state if self.ranks is None else \
                self.ranks.global_state(new_state, part.input_ids.shape[1])

    def _replayed(self, part: Batch, m: int):
        """(loss, state) from the graphed step; None where --cuda_graphs auto's capture failed, which leaves the
        model as it was (the capture's warm-up takes its gradients apart from .grad and gives back the random
        state), so the run goes on eagerly."""
        try:
            return self.graphed(self.runner, part, self.streams[m])
        except Exception as err:
            if self.cfg.cuda_graphs != "auto" or self.graphed.step is not None:
                raise
            logger.warning("--cuda_graphs auto: capturing the step failed (%s: %s); training eagerly "
                           "(--cuda_graphs false skips the attempt, --cuda_graphs true makes it an error)",
                           type(err).__name__, str(err).splitlines()[0][:300] if str(err) else "")
            self.graphed = None
            gc.collect()  # the failed capture's graph pool
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    def _done(self) -> bool:
        return self.max_steps > 0 and self.step >= self.max_steps

    def run(self, stop_at_step: int | None = None) -> RunResult:
        """Train to max_steps (or the time budget). SIGINT (Ctrl-C) and SIGTERM stop it at the next step boundary
        with a checkpoint, as stop_at_step does at that step; a later run with resume=True continues exactly."""
        cfg = self.cfg
        self.model.train()
        self.time_budget = TimeBudget(cfg.time_budget_min, cfg.warmup_steps, self.ranks)
        # a time budget's steps are unknown until _calibrate has timed some (no total: a count, not a percentage)
        bar = progress_bar(total=self.max_steps or None, initial=self.step, desc=cfg.arch,
                           disable=not (self.progress and self.main), dynamic_ncols=True)
        with StopSignals() as stop:
            try:
                while not self._done() and self.step != stop_at_step and not self._stopping(stop):
                    loss = self.train_step()
                    bar.update(1)
                    self._after_step(loss, bar)
            finally:
                bar.close()
            if self._done():
                return self._finish()
            self.checkpoint()
        logger.warning("stopped at step %d; continue with: megalodon train --resume --run-dir %s", self.step,
                       self.run_dir)
        return RunResult(self.run_dir, self.step, math.nan, math.nan, self.tokens / max(self.train_time, 1e-9), "",
                         finished=False, stopped_by=stop.received or self._stop_signal)

    def _stopping(self, stop: StopSignals) -> bool:
        """Whether a stop signal arrived; on several ranks, at any rank, so that all stop at the same step."""
        if self.ranks is None:
            return stop.received is not None
        self._stop_signal = self.ranks.max(stop.received or 0)
        return self._stop_signal > 0

    def _calibrate(self, bar) -> None:
        """Turn the wall-clock budget into max_steps (TimeBudget), and size the progress bar."""
        captured = self.graphed is not None and self.graphed.step is not None
        max_steps, total = self.time_budget.observe(self.step, self.elapsed, captured)
        if max_steps is not None:
            self.max_steps = max_steps
        if total is not None:
            bar.total = total

    def _after_step(self, loss: float, bar) -> None:
        cfg, step = self.cfg, self.step
        if self.max_steps == 0:
            self._calibrate(bar)
        last = step == self.max_steps
        if step % cfg.log_every == 0 or last:
            rate = self.tokens / max(self.train_time, 1e-9)  # training steps only: evaluation is not training
            fp16 = {"loss_scale": self.loss_scale, "skipped_steps": self.loss_scaling.skipped} \
                if self.loss_scaling.enabled else {}
            self.log({"step": step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                      "grad_norm": self.grad_norm, "tokens": self.tokens, "tokens_per_s": rate,
                      "train_s": self.train_time, "elapsed_s": self.elapsed, **fp16})
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            with self._out_of_memory("in evaluation", lambda: EVALUATION_FIXES,
                                     f"{cfg.eval_batch_size} x {cfg.seq_len} tokens a call"):
                result = evaluate(self.model, self.val_store, cfg, self.chunk, self.pad_id, self.device, self.ranks)
            self.log({"step": step, **result})
            if self.main:
                bar.write(f"step {step}: val loss {result['val_loss']:.4f}, bits/byte {result['val_bpb']:.4f}")
        if cfg.sample_every and step % cfg.sample_every == 0:
            model = self._whole_model()
            if self.main:
                bar.write(f"step {step} sample: {sample_text(model, self.tokenizer, cfg, self.device)!r}")
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last:
            self.checkpoint()

    def _whole_model(self) -> torch.nn.Module | None:
        """The model as one process holds it, on rank 0 (None elsewhere): a plain copy on several ranks, gathered
        from the shards (collective). Sampling and the final model directory use it."""
        if self.ranks is None:
            return self.model
        return self.ranks.whole_model(self.model, lambda: build_model(self.cfg, self.tokenizer.vocab_size))

    def _finish(self) -> RunResult:
        model = self._whole_model()

        def report() -> tuple[dict, str]:
            save_pretrained(model, self.run_dir / "model")
            sample = sample_text(model, self.tokenizer, self.cfg, self.device)
            timing = {"tokens": self.tokens, "train_s": self.train_time, "wall_s": self.elapsed}
            precision = {"precision": precision_name(self.cfg, self.device), **self.loss_scaling.summary()}
            final = write_report(self.run_dir, self.cfg, model, sample, self.batcher.padding_fraction, timing,
                                 precision)
            return final, sample

        final, sample = self._on_main(report)
        return RunResult(self.run_dir, self.step, final["val_loss"], final["val_bpb"], final["tokens_per_s"], sample)


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
          device: str = "cpu", progress: bool = True, stop_at_step: int | None = None) -> RunResult:
    """Build a Trainer, run it (see Trainer.run) and release its run directory."""
    with Trainer(cfg, run_dir, resume, overwrite, device, progress) as trainer:
        return trainer.run(stop_at_step)
