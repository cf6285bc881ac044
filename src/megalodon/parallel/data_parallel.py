"""Data parallelism applied from outside the model: one (dp, cp) device mesh, FSDP2 or DDP.

The mesh has two named dimensions: `dp` (replicas that read different rows) and `cp` (chunk-parallel ranks that
hold different segments of the same rows). FSDP shards over both at once (the flattened `dp_cp` dimension), so one
reduce-scatter also sums the chunk-parallel ranks' gradients: there is no separate all-reduce for them.

Loss convention (`data_parallel_loss`): every rank backpropagates its share of the token mean over all ranks,
scaled by the number of ranks that FSDP or DDP average over. The averaged gradient is then exactly that of the
global token mean, whatever the split of rows and segments.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn.parallel import DistributedDataParallel

SHARD_DIM = "dp_cp"


def init_mesh(chunk_parallel: int = 1, device_type: str | None = None) -> DeviceMesh:
    """The (dp, cp) mesh over every rank, with dp = world size / chunk_parallel.

    Starts the default process group if needed (gloo on CPU, NCCL on CUDA, from torchrun's environment; on CUDA
    each process takes the GPU of its LOCAL_RANK). The chunk-parallel group is `mesh["cp"].get_group()`."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    world = dist.get_world_size()
    if chunk_parallel < 1 or world % chunk_parallel:
        raise ValueError(f"chunk_parallel={chunk_parallel} must divide the number of ranks ({world}); "
                         f"the data-parallel degree is ranks / chunk_parallel")
    mesh = init_device_mesh(device_type, (world // chunk_parallel, chunk_parallel), mesh_dim_names=("dp", "cp"))
    mesh["dp", "cp"]._flatten(SHARD_DIM)  # registered on the mesh: mesh["dp_cp"] from here on
    return mesh


def _reduction_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The ranks whose gradients are averaged: all of a (dp, cp) mesh, or a 1-D mesh as given."""
    if mesh.ndim == 1:
        return mesh
    with warnings.catch_warnings():  # torch 2.13 notes that this slicing will change; it works as documented
        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
        return mesh[SHARD_DIM]


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None = None,
               reshard_after_forward: bool = True) -> nn.Module:
    """Shard a Megalodon with FSDP2 over the whole mesh: one unit per block, the rest in the root unit.

    param_dtype=torch.bfloat16 computes in bf16 and reduces gradients in fp32; the TimestepNorm and CEMA
    parameters then get their own units that stay fp32 (their math is fp32, spec section 4). Call after
    `apply_chunk_parallel` and before building the optimizer. Returns the model (now an FSDPModule)."""
    # Imported here: FSDP brings DTensor, over a second of every single-process run's start otherwise.
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    shard = _reduction_mesh(mesh)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    keep_fp32 = param_dtype is not None and param_dtype != torch.float32
    for block in model.layers:
        if keep_fp32:
            fully_shard(block.mega.timenorm, mesh=shard, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
            fully_shard(block.mega.cema, mesh=shard, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
        fully_shard(block, mesh=shard, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if keep_fp32:
        fully_shard(model.output.final_norm, mesh=shard, mp_policy=fp32)
    fully_shard(model, mesh=shard, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def apply_ddp(model: nn.Module, mesh: DeviceMesh) -> DistributedDataParallel:
    """Replicate a Megalodon over the mesh's dp ranks with DDP. Returns the wrapper (the model is `.module`).

    Chunk parallelism needs FSDP, which reduces over dp and cp together; DDP would average the cp ranks'
    partial gradients instead of summing them."""
    if mesh.ndim == 2 and mesh["cp"].size() > 1:
        raise ValueError(f"DDP with chunk parallelism ({mesh['cp'].size()} cp ranks) is not supported: use "
                         "apply_fsdp, whose reduce-scatter spans the dp and cp ranks together")
    group = (mesh if mesh.ndim == 1 else mesh["dp"]).get_group()
    device_ids = [torch.cuda.current_device()] if mesh.device_type == "cuda" else None
    return DistributedDataParallel(model, process_group=group, device_ids=device_ids)


def data_parallel_loss(loss_sum: Tensor, n_labels: int | Tensor, mesh: DeviceMesh) -> tuple[Tensor, Tensor]:
    """From this rank's summed token loss and label count: (what to backpropagate, the global token mean).

    The global mean is sum(loss_sum) / sum(n_labels) over every rank of the mesh (detached, for logging).
    The backpropagated loss is this rank's loss_sum * ranks / sum(n_labels): FSDP and DDP average gradients over
    the ranks, and the cross-rank terms of chunk parallelism reach each rank through its all-gathers, so the
    result is the gradient of the global mean."""
    reduction = _reduction_mesh(mesh)
    totals = torch.stack([loss_sum.detach().to(torch.float64),
                          torch.as_tensor(n_labels, dtype=torch.float64, device=loss_sum.device)])
    dist.all_reduce(totals, group=reduction.get_group())
    count = totals[1].clamp(min=1.0)
    return loss_sum * (reduction.size() / count), totals[0] / count
