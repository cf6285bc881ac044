"""The trainer's side of a distributed run: which rows and which segment this rank holds, the wrapped model, and
agreement between ranks (an error on rank 0 reaches every rank, so that none is left waiting in a collective).

Every rank builds the same global batch (the packed stream is cheap to cut) and keeps its dp replica's rows; the
cp ranks of a replica keep one segment of each of those rows. The data cursor, the step and the carried states are
therefore global quantities, the same whatever the number of ranks, which is what lets a run resume on another.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from megalodon.data import Batch
from megalodon.parallel.chunk import apply_chunk_parallel, local_segment
from megalodon.parallel.data_parallel import apply_ddp, apply_fsdp, init_mesh


def launched_distributed() -> bool:
    """Whether this process is one of several ranks (torchrun sets WORLD_SIZE; a test pool starts the group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_device(device: torch.device) -> torch.device:
    """A CUDA rank uses the GPU of its LOCAL_RANK (torchrun gives each process of a node its own index)."""
    if device.type == "cuda" and launched_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed of its own for each (run seed, step, rank): 63 bits of their SHA-256."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:8], "little") >> 1


@dataclass
class Ranks:
    """This process's place in a (dp, cp) mesh, and the collectives the trainer needs."""

    mesh: DeviceMesh
    parallel: str  # "fsdp" or "ddp"
    chunk_size: int
    started_group: bool  # we started the default process group, so we end it

    @classmethod
    def for_run(cls, parallel: str, chunk_parallel: int, chunk_size: int, device: torch.device,
                timeout_min: float) -> "Ranks | None":
        """The (dp, cp) mesh when this process is one of several ranks; None in a single process."""
        if launched_distributed():
            return cls.start(parallel, chunk_parallel, chunk_size, device, timeout_min)
        if chunk_parallel > 1:
            raise ValueError(f"--chunk_parallel {chunk_parallel} splits sequences across ranks, and this is one "
                             f"process: launch with --nproc N or torchrun --nproc_per_node N (N a multiple of "
                             f"{chunk_parallel})")
        return None

    @classmethod
    def start(cls, parallel: str, chunk_parallel: int, chunk_size: int, device: torch.device,
              timeout_min: float) -> "Ranks":
        started = not dist.is_initialized()
        if started:  # init_mesh would start it too, without our timeout
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(minutes=timeout_min))
        try:
            mesh = init_mesh(chunk_parallel, device.type)
        except BaseException:
            if started:
                dist.destroy_process_group()
            raise
        return cls(mesh, parallel, chunk_size, started)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world(self) -> int:
        return dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def dp(self) -> int:
        return self.mesh["dp"].size()

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    @property
    def cp(self) -> int:
        return self.mesh["cp"].size()

    def seed_step(self, seed: int, step: int) -> None:
        """Seed this rank's random streams (CPU and GPUs) for a training step: every rank built the same weights
        from one seed, and would otherwise draw the same dropout masks for other rows. Derived from the step, so a
        run resumed on the same mesh draws what the uninterrupted one drew, with no random state in the checkpoint."""
        torch.manual_seed(step_seed(seed, step, self.rank))

    def check_shapes(self, batch_size: int, grad_accum: int, seq_len: int) -> None:
        if batch_size % (self.dp * grad_accum):
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of the data-parallel ranks x grad_accum "
                             f"({self.dp} x {grad_accum} = {self.dp * grad_accum}): each replica takes an equal "
                             "share of the rows of every micro-batch")
        if seq_len % (self.cp * self.chunk_size):
            raise ValueError(f"seq_len ({seq_len}) must be a multiple of chunk_parallel x chunk_size "
                             f"({self.cp} x {self.chunk_size} = {self.cp * self.chunk_size}) under chunk parallelism")

    def wrap(self, model: nn.Module) -> nn.Module:
        """Chunk parallelism, then FSDP2 or DDP. Returns what to call: the model (sharded in place) or DDP's wrapper."""
        from megalodon.model import Megalodon

        if not isinstance(model, Megalodon) and (self.cp > 1 or self.parallel == "fsdp"):
            raise ValueError("FSDP and chunk parallelism apply to Megalodon only; train the Llama baseline with "
                             "--parallel ddp")
        if self.cp > 1:
            apply_chunk_parallel(model, self.mesh["cp"].get_group())
        if self.parallel == "ddp":
            return apply_ddp(model, self.mesh)
        # FSDP2 notes on every call that a block returns a view, in case the caller changes it in place; nothing
        # here does (the tests compare every gradient with one process), so the note would only be noise.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        return apply_fsdp(model, self.mesh)  # fp32 parameters: bf16 comes from autocast, as in one process

    def rows(self, batch: Batch) -> Batch:
        """This replica's rows of a global batch, cut to this rank's segment under chunk parallelism."""
        share = batch.input_ids.shape[0] // self.dp
        rows = slice(self.dp_rank * share, (self.dp_rank + 1) * share)
        return self.segment(Batch(batch.input_ids[rows], batch.labels[rows], batch.doc_start[rows],
                                  batch.continues[rows]))

    def segment(self, batch: Batch) -> Batch:
        if self.cp == 1:
            return batch
        group = self.mesh["cp"].get_group()
        cut = [local_segment(t, group, self.chunk_size) for t in (batch.input_ids, batch.labels, batch.doc_start)]
        return Batch(*cut, batch.continues)

    def global_state(self, state, local_length: int):
        """A carried state after a chunk-parallel window counts only this rank's tokens in `position`: count the
        whole window, as one process would (the CEMA and norm states are already global)."""
        if state is None or self.cp == 1:
            return state
        return replace(state, position=state.position + (self.cp - 1) * local_length)

    def sum(self, values: list[float], group=None) -> list[float]:
        """Each value summed over every rank (or over `group`), in float64."""
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        totals = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(totals, group=group)
        return totals.tolist()

    def max(self, value: int) -> int:
        """The largest of every rank's value."""
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        top = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        return int(top)

    def sum_cp(self, values: list[float]) -> list[float]:
        return values if self.cp == 1 else self.sum(values, self.mesh["cp"].get_group())

    def on_main(self, fn):
        """Run fn on rank 0 only; every rank returns its result or raises its error, of the same type and text."""
        outcome = [None]
        if self.main:
            try:
                outcome = [(True, fn())]
            except Exception as err:  # noqa: BLE001 - raised again on every rank below
                outcome = [(False, err)]
        dist.broadcast_object_list(outcome, src=0)
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def agree(self, ok: bool, error: str) -> None:
        """Raise ValueError(error) on every rank when any rank says not ok."""
        flags = self.sum([0.0 if ok else 1.0])
        if flags[0]:
            raise ValueError(error)

    def gather(self, obj) -> list:
        """obj from every rank, in rank order, on every rank."""
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_rows(self, mine):
        """Each replica's rows of a state (MegalodonState), stacked in global row order; None if any is None."""
        from megalodon.state import MegalodonState

        everyone = self.gather(mine)[::self.cp]  # one rank per replica: its cp ranks hold the same state
        return None if any(s is None for s in everyone) else MegalodonState.stack(everyone)

    def whole_model(self, model: nn.Module, build) -> nn.Module | None:
        """On rank 0, a plain copy of the sharded or replicated `model` made by `build()`; None elsewhere.
        Collective: every rank gathers the full weights to rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.main:
            return None
        with torch.random.fork_rng(devices=[]):  # initializing the copy must not move rank 0's random stream
            copy = build()
        copy.load_state_dict(full)
        return copy.to(next(model.parameters()).device).train(model.training)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self.started_group and dist.is_initialized():
            dist.destroy_process_group()
