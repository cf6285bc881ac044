"""What the trainer computes: bf16 autocast where it is fast (fp16 where asked), the summed loss of a batch, the
validation loss of a whole split, and a text sample."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from megalodon.data import IGNORE_INDEX, Batch, TokenStore, bits_per_byte, eval_windows
from megalodon.model import Megalodon
from megalodon.ops.attention import launches_without_host_cost
from megalodon.precision import dtype_name, fast_bf16
from megalodon.training.config import TrainConfig


def replays_cuda_graphs(cfg: TrainConfig) -> bool:
    """Whether the compiled blocks replay CUDA graphs (torch.compile's cudagraph trees). Their outputs live in the
    graphs' memory, which the next step's replay overwrites, so a state carried from one step (or validation
    window) to the next must be copied out first (torch.compiler_cudagraph_trees)."""
    return cfg.compile_mode in ("reduce-overhead", "max-autotune")  # TrainConfig allows a mode only with compile


def uses_cuda_graphs(cfg: TrainConfig, device: torch.device, distributed: bool) -> bool:
    """Whether the trainer replays its steps from CUDA graphs (training/cuda_graphs.py): --cuda_graphs true, or
    auto on one CUDA GPU where nothing rules them out (several ranks, activation checkpointing, compiled blocks
    that replay graphs of their own; ROCm's graphs have never run here). Short steps gain most: on an H200 a
    mega200M step at 4K ran 4.8x faster graphed than eager (docs/gpu.md)."""
    if cfg.cuda_graphs != "auto":
        return cfg.cuda_graphs == "true"
    return (device.type == "cuda" and torch.version.hip is None and not distributed
            and not cfg.activation_checkpointing and not replays_cuda_graphs(cfg))


def graph_launches(cfg: TrainConfig):
    """For a training step's forward: where the compiled blocks replay CUDA graphs, the host pays nothing per
    launch, so the ops may take their form of least GPU work (ops/attention.py's launches_without_host_cost)."""
    return launches_without_host_cost() if replays_cuda_graphs(cfg) else nullcontext()


def carried(state, cfg: TrainConfig):
    """The state to carry into the next call: detached (truncated BPTT), and copied out of the CUDA graphs'
    memory where the blocks replay them."""
    if state is None:
        return None
    state = state.detach()
    return state.clone() if replays_cuda_graphs(cfg) else state


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the run asks for it or where it is fast (dtype "auto"), fp16 where it asks for it; None: fp32."""
    if cfg.dtype == "fp16":
        return torch.float16
    return torch.bfloat16 if cfg.dtype == "bf16" or (cfg.dtype == "auto" and fast_bf16(device)) else None


def precision_name(cfg: TrainConfig, device: torch.device) -> str:
    """fp32, bf16 or fp16: what the run's autocast computes in on this device."""
    return dtype_name(autocast_dtype(cfg, device) or torch.float32)


def precision_notes(cfg: TrainConfig, device: torch.device) -> list[str]:
    """What a user should know about the precision the run will take on this device: a GPU that `auto` leaves in
    fp32 has fp16 tensor cores, and a CPU runs fp16 emulated."""
    if cfg.dtype == "auto" and device.type == "cuda" and not fast_bf16(device):
        return [f"{torch.cuda.get_device_name(device)} has no bf16 tensor cores, so --dtype auto trains in fp32; "
                "--dtype fp16 trains on its fp16 ones (with loss scaling), usually several times faster"]
    if cfg.dtype == "fp16" and device.type == "cpu":
        return ["--dtype fp16 is for GPUs without bf16 tensor cores (V100, T4); on a CPU fp16 matmuls run emulated, "
                "slower than fp32 (and than bf16 on CPUs with AMX or AVX512-BF16): --dtype auto picks the faster"]
    return []


def autocast(cfg: TrainConfig, device: torch.device):
    dtype = autocast_dtype(cfg, device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def forward_loss(model, batch: Batch, state, stateful: bool):
    """Summed cross-entropy (nats) over the batch's labels, and the carried state when stateful (Megalodon). The
    model computes it from its last hidden states a block of tokens at a time, never holding every logit
    (ops/loss.py)."""
    if stateful:
        return model(batch.input_ids, state=state, return_state=True, doc_start=batch.doc_start,
                     targets=batch.labels)
    return model(batch.input_ids, doc_start=batch.doc_start, targets=batch.labels), None


@torch.no_grad()
def evaluate(model, store: TokenStore, cfg: TrainConfig, chunk: int, pad_id: int, device, ranks=None) -> dict:
    """Loss over a split, streaming windows of each document with the carried state: the whole split, or its first
    cfg.eval_tokens labels (bits/byte then count the split's bytes in proportion to the tokens read).

    On several ranks (megalodon.parallel.runtime.Ranks) each data-parallel replica reads its share of the rows
    (all of them when eval_batch_size is not a multiple of the replicas), each chunk-parallel rank its segment of
    them; the result is the same on every rank."""
    was_training = model.training
    model.eval()
    shard_rows = ranks is not None and cfg.eval_batch_size % ranks.dp == 0
    count, state = 0, None
    nats = torch.zeros((), dtype=torch.float64, device=device)  # read once at the end: no wait for the GPU a window
    for batch in eval_windows(store, cfg.seq_len, chunk, pad_id, cfg.eval_batch_size):
        count += int((batch.labels != IGNORE_INDEX).sum())  # of the whole window: every rank stops together
        if ranks is not None:
            batch = ranks.rows(batch) if shard_rows else ranks.segment(batch)
        batch = batch.to(device)
        with autocast(cfg, device):
            loss, state = forward_loss(model, batch, state, stateful=isinstance(model, Megalodon))
        state = carried(state, cfg)
        nats += loss.double()
        if cfg.eval_tokens and count >= cfg.eval_tokens:
            break
    model.train(was_training)
    nats = float(nats)
    if ranks is not None:
        nats = (ranks.sum([nats]) if shard_rows else ranks.sum_cp([nats]))[0]
    mean = nats / max(count, 1)
    n_bytes = store.n_bytes * min(1.0, count / max(store.n_tokens - store.n_docs, 1))  # every label, if all read
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0)), "val_bpb": bits_per_byte(nats, n_bytes)}


@torch.no_grad()
def sample_text(model, tokenizer, cfg: TrainConfig, device, temperature: float = 0.8, top_k: int = 50) -> str:
    """A short continuation of the sample prompt: the sanity check a person reads."""
    from megalodon.inference.generate import generate
    from megalodon.inference.sampling import SamplingConfig, make_generators, sample_next

    sampling = SamplingConfig(temperature=temperature, top_k=top_k, seed=cfg.seed, max_new_tokens=cfg.sample_tokens)
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, Megalodon):
            return cfg.sample_prompt + generate(model, tokenizer, [cfg.sample_prompt], sampling)[0].text
        # The baseline decodes with its KV cache; same sampler, same seed, the same CPU generator as generate().
        ids = torch.tensor([tokenizer.encode(cfg.sample_prompt)], device=device)
        generators = make_generators(cfg.seed, 1)
        logits, past = model(ids, return_past=True)
        new: list[int] = []
        for _ in range(cfg.sample_tokens):
            token = int(sample_next(logits[:, -1], [new], sampling, generators)[0])
            if token == tokenizer.eos_id:
                break
            new.append(token)
            logits, past = model(torch.tensor([[token]], device=device), past=past, return_past=True)
        return cfg.sample_prompt + tokenizer.decode(new)
    finally:
        model.train(was_training)
