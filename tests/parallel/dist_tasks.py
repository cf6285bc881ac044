"""What the spawned ranks run (rank_pool.RankPool.run): each function runs on all 4 ranks of the pool at once and
returns plain numbers for the test to assert on. The single-process reference is recomputed on every rank."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import tiny_model
from megalodon.parallel import (apply_chunk_parallel, apply_ddp, apply_fsdp, data_parallel_loss, init_mesh,
                                local_segment)

CHUNK = 8  # tiny_config's chunk_size
IGNORE = -100
_MESHES = {}


def mesh_for(chunk_parallel: int):
    """One (dp, cp) mesh per degree for the life of the pool (building one creates process groups)."""
    if chunk_parallel not in _MESHES:
        _MESHES[chunk_parallel] = init_mesh(chunk_parallel, "cpu")
    return _MESHES[chunk_parallel]


def fp32_model(seed: int = 0):
    return tiny_model(torch.float32, seed=seed).train()


def packed_batch(batch: int, length: int, seed: int):
    """Token ids, labels and doc_start for `batch` rows of `length` (64 in the picture below). Row 0 is one
    document. Row 1 has documents starting at chunks 1 and 5, which cross the segment boundaries at P = 2 and 4
    (and a reset inside an earlier segment cuts the prefix). Row 2 has documents starting exactly at every
    boundary of P = 2 and P = 4."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (batch, length), generator=gen)
    labels = torch.randint(0, 64, (batch, length), generator=gen)
    doc_start = torch.zeros(batch, length, dtype=torch.bool)
    doc_start[:, 0] = True
    if batch > 1:
        doc_start[1, [CHUNK, length // 2 + CHUNK]] = True
    if batch > 2:
        doc_start[2, ::length // 4] = True
    return ids, labels, doc_start


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the largest |b| (at least 1e-3, so that near-zero tensors are compared absolutely)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-3))


def full_params(model) -> dict:
    """Every parameter as a plain full tensor (FSDP shards gathered)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


# ---- chunk parallelism alone: one forward and backward ---------------------------------------------------------

def chunk_parallel_matches_one_process(chunk_parallel: int) -> dict:
    """Logits, loss, every gradient and the final state of chunk-parallel ranks against one process, fresh and
    with an incoming state. Gradients are summed over the cp group here, as FSDP would."""
    mesh = mesh_for(chunk_parallel)
    group = mesh["cp"].get_group()
    batch, length = 3, 64
    ids, labels, doc_start = packed_batch(batch, length, seed=100 + mesh["dp"].get_local_rank())
    errors = {}
    for name, prefix in (("fresh", 0), ("with_state", 2 * CHUNK)):
        reference = fp32_model()
        model = apply_chunk_parallel(copy.deepcopy(reference), group)
        state, doc_start = None, doc_start.clone()
        if prefix:  # the state after a shorter sequence, handed to every rank as the stream's incoming state
            with torch.no_grad():
                _, state = reference(ids[:, :prefix].flip(1), return_state=True)
            doc_start[:, 0] = False  # the rows continue that stream

        ref_logits, ref_state = reference(ids, state=state, return_state=True, doc_start=doc_start)
        ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten())
        ref_loss.backward()

        segment = [local_segment(t, group, CHUNK) for t in (ids, labels, doc_start)]
        logits, cp_state = model(segment[0], state=state, return_state=True, doc_start=segment[2])
        loss_sum = F.cross_entropy(logits.flatten(0, 1), segment[1].flatten(), reduction="sum")
        (loss_sum / labels.numel()).backward()  # this rank's share of the global mean
        loss = loss_sum.detach() / labels.numel()
        dist.all_reduce(loss, group=group)

        grad_err = 0.0
        for (pname, p), ref_p in zip(model.named_parameters(), reference.parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad, group=group)
            grad_err = max(grad_err, max_rel(grad, ref_p.grad))
        state_err = max(max_rel(a, b) for a, b in zip(_state_tensors(cp_state), _state_tensors(ref_state)))
        errors[name] = {"logits": max_rel(logits, local_segment(ref_logits, group, CHUNK)),
                        "loss": abs(float(loss) - float(ref_loss)), "grad": grad_err, "state": state_err}
    return errors


def _state_tensors(state):
    """The parts of a MegalodonState that chunk parallelism makes global: CEMA states and norm statistics."""
    for layer in state.layers:
        yield torch.view_as_real(layer.cema_h)
        yield from (t.to(torch.float64) for t in layer.norm)
    yield from (t.to(torch.float64) for t in state.final_norm)


def bad_inputs_raise() -> dict:
    """The errors every rank reports for inputs that cannot work. Segments off the chunk grid (rank 0 of each cp
    pair holds 12 tokens) must fail on every rank alike, none left waiting in a collective."""
    mesh = mesh_for(2)
    group = mesh["cp"].get_group()
    attempts = {
        "segments": lambda: apply_chunk_parallel(fp32_model(), group)(
            torch.zeros(2, 12 if dist.get_rank(group) == 0 else 20, dtype=torch.long)),
        "local_segment": lambda: local_segment(torch.zeros(1, 24), group, CHUNK),
        "ddp": lambda: apply_ddp(fp32_model(), mesh),
    }
    messages = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            messages[name] = "no error"
        except ValueError as error:
            messages[name] = str(error)
    return messages


# ---- training: 3 optimizer steps against one process -----------------------------------------------------------

STEPS, BATCH, LENGTH = 3, 4, 32


def optimizer_for(model):
    # SGD, not AdamW: Adam's update ignores the gradient's scale (a cp gradient averaged instead of summed would
    # pass), and it turns elements with near-zero gradients into +-lr steps decided by rounding noise.
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def _reference_run(batches) -> tuple[list[float], dict]:
    model = fp32_model()
    optimizer = optimizer_for(model)
    losses = []
    for ids, labels, doc_start in batches:
        logits = model(ids, doc_start=doc_start)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses, full_params(model)


def _batches():
    """The global batches: one ignored label span, so that ranks hold different label counts."""
    out = []
    for step in range(STEPS):
        ids, labels, doc_start = packed_batch(BATCH, LENGTH, seed=step)
        labels[0, :5] = IGNORE
        out.append((ids, labels, doc_start))
    return out


def _train(model, mesh, rows: slice, cp_group=None) -> tuple[list[float], dict]:
    optimizer = optimizer_for(model)
    losses = []
    for ids, labels, doc_start in _batches():
        ids, labels, doc_start = (t[rows] for t in (ids, labels, doc_start))
        if cp_group is not None:
            ids, labels, doc_start = (local_segment(t, cp_group, CHUNK) for t in (ids, labels, doc_start))
        logits = model(ids, doc_start=doc_start)
        loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        to_backward, mean = data_parallel_loss(loss_sum, int((labels != IGNORE).sum()), mesh)
        to_backward.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(mean))
    return losses, full_params(getattr(model, "module", model))


def _compare(run, reference) -> dict:
    (losses, params), (ref_losses, ref_params) = run, reference
    return {"loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "weights": max(max_rel(params[k], ref_params[k]) for k in ref_params),
            "moved": _relative_change(full_params(fp32_model()), ref_params)}


def _relative_change(before: dict, after: dict) -> float:
    """|after - before| / |before| over all parameters together."""
    change = sum(float((after[k] - p).square().sum()) for k, p in before.items())
    return (change / sum(float(p.square().sum()) for p in before.values())) ** 0.5


def data_parallel_matches_one_process(kind: str) -> dict:
    """DDP or FSDP2 over 2 ranks (each dp pair of the 2 x 2 mesh), global batch 4 split 2 + 2."""
    dp = mesh_for(2)["dp"]
    rows = slice(2 * dp.get_local_rank(), 2 * dp.get_local_rank() + 2)
    model = fp32_model()
    model = apply_ddp(model, dp) if kind == "ddp" else apply_fsdp(model, dp)
    return _compare(_train(model, dp, rows), _reference_run(_batches()))


def mesh_2x2_matches_one_process() -> dict:
    """Chunk parallel over cp = 2 and FSDP over the flattened (dp, cp) = 4 ranks, 3 steps."""
    mesh = mesh_for(2)
    dp_rank = mesh["dp"].get_local_rank()
    model = apply_fsdp(apply_chunk_parallel(fp32_model(), mesh["cp"].get_group()), mesh)
    run = _train(model, mesh, slice(2 * dp_rank, 2 * dp_rank + 2), mesh["cp"].get_group())
    return _compare(run, _reference_run(_batches()))


def bf16_policy_keeps_cema_and_norm_fp32() -> dict:
    """Under a bf16 FSDP policy on the 2 x 2 mesh: the dtypes the layers compute with, and the loss."""
    mesh = mesh_for(2)
    model = apply_fsdp(apply_chunk_parallel(fp32_model(), mesh["cp"].get_group()), mesh,
                       param_dtype=torch.bfloat16)
    seen = {}
    block = model.layers[0]
    probes = {"cema": (block.mega.cema, lambda m: m.alpha), "timenorm": (block.mega.timenorm, lambda m: m.weight),
              "final_norm": (model.output.final_norm, lambda m: m.weight), "wz": (block.mega, lambda m: m.wz.weight)}
    for name, (module, param) in probes.items():
        # Read as the module runs, i.e. with its unit's parameters unsharded in that unit's dtype.
        module.register_forward_pre_hook(lambda m, args, name=name, param=param:
                                         seen.__setitem__(name, str(param(m).dtype)))
    ids, labels, doc_start = (local_segment(t, mesh["cp"].get_group(), CHUNK) for t in packed_batch(2, 32, 0))
    logits = model(ids, doc_start=doc_start)
    loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    to_backward, mean = data_parallel_loss(loss_sum, labels.numel(), mesh)
    to_backward.backward()
    seen["grad"] = str(block.mega.wz.weight.grad.dtype)
    seen["loss"] = float(mean)
    return seen


