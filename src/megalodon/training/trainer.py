"""The training loop: stateful windows, bf16 autocast, accumulation, evaluation, exact resume."""

from __future__ import annotations

import functools
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from megalodon.baseline import Llama, matched_llama_config
from megalodon.checkpoint import save_pretrained
from megalodon.config import MegalodonConfig
from megalodon.data import IGNORE_INDEX, Batch, PackedBatcher, TokenStore, bits_per_byte, eval_windows
from megalodon.model import Megalodon
from megalodon.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, verify_checkpoint
from megalodon.training.config import TrainConfig
from megalodon.training.data import open_splits, prepare_data
from megalodon.training.optim import build_optimizer, lr_at
from megalodon.training.report import write_report

CALIBRATION_STEPS = 5  # steady-state steps timed before a wall-clock budget is turned into max_steps


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    val_loss: float
    val_bpb: float
    tokens_per_s: float
    sample: str


def build_model(cfg: TrainConfig, vocab_size: int) -> torch.nn.Module:
    mega = MegalodonConfig.from_preset(cfg.preset, **{**cfg.model, "vocab_size": vocab_size})
    if cfg.model.get("vocab_size", vocab_size) != vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model['vocab_size']} does not match the tokenizer's "
                         f"vocab_size={vocab_size}; drop the override")
    if cfg.arch == "llama":
        return Llama(matched_llama_config(mega))
    return Megalodon(mega)


def chunk_size_of(cfg: TrainConfig) -> int:
    """Both architectures pack documents on the Megalodon preset's chunk grid, so they see identical tokens."""
    return MegalodonConfig.from_preset(cfg.preset, **cfg.model).chunk_size


def prepare_run_dir(run_dir: Path, cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
    saved = run_dir / "train_config.json"
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            import shutil

            shutil.rmtree(run_dir)
        elif not resume:
            raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to "
                             "replace it")
        elif not saved.is_file():
            raise ValueError(f"{run_dir} is not a training run directory (no train_config.json)")
        else:
            previous = json.loads(saved.read_text())
            ignore = {"max_steps", "time_budget_min"}
            diffs = sorted(k for k in cfg.to_dict() if k not in ignore and previous.get(k) != cfg.to_dict()[k])
            if diffs:
                raise ValueError(f"{run_dir} holds a different run (options differ: {', '.join(diffs)}); "
                                 "use another --run-dir or --overwrite")
    run_dir.mkdir(parents=True, exist_ok=True)


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        forward = block.forward
        block.forward = lambda *args, _f=forward, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls beat fp32 here: on CUDA with bf16 support, or on CPUs with AMX or AVX512-BF16.
    Without those, CPU bf16 matmuls run several times slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return _cpu_has_bf16_units()


@functools.cache
def _cpu_has_bf16_units() -> bool:  # asked on every step: read /proc/cpuinfo once
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and fast_bf16(device)):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def forward_loss(model, batch: Batch, state, stateful: bool):
    """Summed cross-entropy (nats) over the batch's labels, and the carried state when stateful (Megalodon)."""
    if stateful:
        logits, new_state = model(batch.input_ids, state=state, return_state=True, doc_start=batch.doc_start)
    else:
        logits, new_state = model(batch.input_ids, doc_start=batch.doc_start), None
    loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, new_state


@torch.no_grad()
def evaluate(model, store: TokenStore, cfg: TrainConfig, chunk: int, pad_id: int, device) -> dict:
    """Loss over a whole split, streaming windows of each document with the carried state."""
    was_training = model.training
    model.eval()
    nats, count, state = 0.0, 0, None
    for batch in eval_windows(store, cfg.seq_len, chunk, pad_id, cfg.eval_batch_size):
        batch = batch.to(device)
        with autocast(cfg, device):
            loss, state = forward_loss(model, batch, state, stateful=isinstance(model, Megalodon))
        nats += float(loss)
        count += int((batch.labels != IGNORE_INDEX).sum())
    model.train(was_training)
    mean = nats / max(count, 1)
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0)), "val_bpb": bits_per_byte(nats, store.n_bytes)}


class Trainer:
    """One training run: built from a config and a run directory, resumable from its checkpoints."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
                 device: str = "cpu", progress: bool = True):
        self.cfg, self.run_dir, self.device, self.progress = cfg, Path(run_dir), torch.device(device), progress
        prepare_run_dir(self.run_dir, cfg, resume, overwrite)
        torch.set_flush_denormal(True)  # fp32 training slows 3-4x on denormals on these CPUs
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)

        store_dir, self.tokenizer = prepare_data(cfg)
        train_store, self.val_store = open_splits(store_dir)
        if train_store.vocab_size != self.tokenizer.vocab_size:
            raise ValueError(f"the token store's vocab ({train_store.vocab_size}) does not match the tokenizer's "
                             f"({self.tokenizer.vocab_size}); delete {store_dir} to rebuild it")
        self.chunk = chunk_size_of(cfg)
        tok = self.tokenizer
        self.pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
        self.model = build_model(cfg, tok.vocab_size).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.batcher = PackedBatcher(train_store, cfg.batch_size, cfg.seq_len, self.chunk, cfg.seed, self.pad_id)
        self.stateful = cfg.stateful and isinstance(self.model, Megalodon)
        self.streams: list = [None] * cfg.grad_accum  # carried state of each micro-batch's rows
        self.step, self.max_steps, self.tokens, elapsed = 0, cfg.max_steps, 0, 0.0
        if resume:
            elapsed = self._resume()
        (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        tok.save(self.run_dir / "model")

        self.runner = self.model
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if cfg.compile:
            self.runner = torch.compile(self.model)
        self.start_time = time.perf_counter() - elapsed
        self.tensorboard = open_tensorboard(self.run_dir) if cfg.tensorboard else None

    def _resume(self) -> float:
        checkpoints = list_checkpoints(self.run_dir)
        if not checkpoints:
            return 0.0
        latest = checkpoints[-1]
        try:
            verify_checkpoint(latest)
        except ValueError as err:
            older = f"; the previous checkpoint is {checkpoints[-2]}" if len(checkpoints) > 1 else ""
            raise ValueError(f"refusing to resume: {err}{older}. Delete the damaged checkpoint to resume from "
                             "the one before it") from None
        saved, streams = load_checkpoint(latest, self.model, self.optimizer)
        self.streams = [None if s is None else s.to(self.device) for s in streams] or self.streams
        self.batcher.load_state_dict(saved["batcher"])
        self.step, self.max_steps, self.tokens = saved["step"], saved["max_steps"], saved["tokens"]
        _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        return saved["elapsed"]

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    def log(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])

    def checkpoint(self) -> None:
        state = {"max_steps": self.max_steps, "elapsed": self.elapsed, "tokens": self.tokens,
                 "batcher": self.batcher.state_dict()}
        save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state,
                        self.streams if self.stateful else [], self.cfg.keep_checkpoints)

    def train_step(self) -> float:
        """One optimizer step over batch_size rows in grad_accum micro-batches; returns the mean loss."""
        cfg, micro = self.cfg, self.cfg.micro_batch_size
        batch = self.batcher.next_batch().to(self.device)
        n_labels = max(int((batch.labels != IGNORE_INDEX).sum()), 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg, self.max_steps or 10 ** 9)
        total = 0.0
        for m in range(cfg.grad_accum):
            rows = slice(m * micro, (m + 1) * micro)
            part = Batch(batch.input_ids[rows], batch.labels[rows], batch.doc_start[rows], batch.continues[rows])
            with autocast(cfg, self.device):
                loss, new_state = forward_loss(self.runner, part, self.streams[m], self.stateful)
            (loss / n_labels).backward()  # every label weighs the same across micro-batches
            total += float(loss.detach())
            if self.stateful:
                self.streams[m] = new_state.detach()  # truncated BPTT: the state goes on, its graph does not
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += batch.input_ids.numel()
        return total / n_labels

    def run(self, stop_at_step: int | None = None) -> RunResult:
        """Train to max_steps (or the time budget). stop_at_step: checkpoint and stop there, as an interrupted
        run would (Ctrl-C does the same); a later run with resume=True continues exactly."""
        cfg = self.cfg
        self.model.train()
        self._pace_from: tuple[int, float] | None = None
        bar = tqdm(total=self.max_steps or self.step + CALIBRATION_STEPS, initial=self.step, desc=cfg.arch,
                   disable=not self.progress, dynamic_ncols=True)
        try:
            while (self.max_steps == 0 or self.step < self.max_steps) and self.step != stop_at_step:
                loss = self.train_step()
                bar.update(1)
                self._after_step(loss, bar)
        except KeyboardInterrupt:
            bar.write("interrupted")
        finally:
            bar.close()
        if self.step < self.max_steps or self.max_steps == 0:
            self.checkpoint()
            print(f"stopped at step {self.step}; continue with --resume --run-dir {self.run_dir}")
            return RunResult(self.run_dir, self.step, math.nan, math.nan, self.tokens / self.elapsed, "")
        return self._finish()

    def _calibrate(self, step: int, bar) -> None:
        """Turn the wall-clock budget into max_steps from the pace of steady-state steps.

        The estimate is final at the end of warmup: the schedule does not depend on max_steps before then, so
        the run (and any resumed run) follows one fixed schedule. Until then it only sizes the progress bar."""
        if self._pace_from is None:  # the first step of this process pays one-off costs: leave it out
            self._pace_from = (step, self.elapsed)
            return
        first_step, first_time = self._pace_from
        if step - first_step < CALIBRATION_STEPS:
            return
        per_step = (self.elapsed - first_time) / (step - first_step)
        estimate = step + int((self.cfg.time_budget_min * 60 - self.elapsed) / per_step)
        if step >= self.cfg.warmup_steps:
            self.max_steps = max(step + 1, estimate)
        bar.total = max(step + 1, estimate)

    def _after_step(self, loss: float, bar) -> None:
        cfg, step = self.cfg, self.step
        if self.max_steps == 0:
            self._calibrate(step, bar)
        last = step == self.max_steps
        if step % cfg.log_every == 0 or last:
            rate = self.tokens / max(self.elapsed, 1e-9)
            self.log({"step": step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                      "tokens": self.tokens, "tokens_per_s": rate, "elapsed_s": self.elapsed})
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            result = evaluate(self.model, self.val_store, cfg, self.chunk, self.pad_id, self.device)
            self.log({"step": step, **result})
            bar.write(f"step {step}: val loss {result['val_loss']:.4f}, bits/byte {result['val_bpb']:.4f}")
        if cfg.sample_every and step % cfg.sample_every == 0:
            bar.write(f"step {step} sample: {sample_text(self.model, self.tokenizer, cfg, self.device)!r}")
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last:
            self.checkpoint()

    def _finish(self) -> RunResult:
        save_pretrained(self.model, self.run_dir / "model")
        sample = sample_text(self.model, self.tokenizer, self.cfg, self.device)
        final = write_report(self.run_dir, self.cfg, self.model, sample, self.batcher.padding_fraction)
        return RunResult(self.run_dir, self.step, final["val_loss"], final["val_bpb"], final["tokens_per_s"], sample)


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
          device: str = "cpu", progress: bool = True, stop_at_step: int | None = None) -> RunResult:
    """Build a Trainer and run it (see Trainer.run)."""
    return Trainer(cfg, run_dir, resume, overwrite, device, progress).run(stop_at_step)


def open_tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint we resume from, so the log reads as one run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


@torch.no_grad()
def sample_text(model, tokenizer, cfg: TrainConfig, device, temperature: float = 0.8, top_k: int = 50) -> str:
    """A short continuation of the sample prompt: the sanity check a person reads."""
    from megalodon.inference.generate import generate
    from megalodon.inference.sampling import SamplingConfig, sample_next

    sampling = SamplingConfig(temperature=temperature, top_k=top_k, seed=cfg.seed, max_new_tokens=cfg.sample_tokens)
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, Megalodon):
            return cfg.sample_prompt + generate(model, tokenizer, [cfg.sample_prompt], sampling)[0].text
        # The baseline decodes with its KV cache; same sampler, same seed.
        ids = torch.tensor([tokenizer.encode(cfg.sample_prompt)], device=device)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        logits, past = model(ids, return_past=True)
        new: list[int] = []
        for _ in range(cfg.sample_tokens):
            token = int(sample_next(logits[:, -1], [new], sampling, [generator])[0])
            if token == tokenizer.eos_id:
                break
            new.append(token)
            logits, past = model(torch.tensor([[token]], device=device), past=past, return_past=True)
        return cfg.sample_prompt + tokenizer.decode(new)
    finally:
        model.train(was_training)
