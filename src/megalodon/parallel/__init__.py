"""Distributed training, applied to a plain Megalodon from outside (torchtitan style): the layers hold no
process groups of their own until `apply_chunk_parallel` gives the TimestepNorm and CEMA layers one.

    mesh = init_mesh(chunk_parallel=P)                   # (dp, cp) over all ranks
    apply_chunk_parallel(model, mesh["cp"].get_group())  # if P > 1: each rank holds one segment of every row
    apply_fsdp(model, mesh, param_dtype=torch.bfloat16)  # or apply_ddp(model, mesh) when P == 1
    ids = local_segment(full_ids, mesh["cp"].get_group(), chunk_size)
    to_backward, mean_loss = data_parallel_loss(loss_sum, n_labels, mesh)

See docs/distributed.md.
"""

from megalodon.parallel.chunk import (ChunkParallelCEMA, ChunkParallelTimestepNorm, apply_chunk_parallel,
                                      local_segment)
from megalodon.parallel.data_parallel import apply_ddp, apply_fsdp, data_parallel_loss, init_mesh

__all__ = ["ChunkParallelCEMA", "ChunkParallelTimestepNorm", "apply_chunk_parallel", "apply_ddp", "apply_fsdp",
           "data_parallel_loss", "init_mesh", "local_segment"]
