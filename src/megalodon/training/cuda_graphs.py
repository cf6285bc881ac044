"""A training step's forward and backward replayed from CUDA graphs, for batches of one fixed shape.

At short lengths a Megalodon step on a GPU is bound by the host, not the GPU: on an H100 a mega200M step at 4K
kept the GPU busy 35 ms of its 93 (docs/gpu.md, "H100 figures"), the rest being Python, the custom ops'
dispatch and Triton's launcher, once for each of about 1,900 kernels. Captured once, a step costs two graph
replays on the host. torch.cuda.make_graphed_callables does the capture (warm-up on a side stream, one graph
for the forward and one for the backward, the parameters as static inputs); this module fits a model and a loss
function to it (`graphed_loss`), and the trainer's micro-batches with their carried state (`GraphedForwardLoss`,
`megalodon train --cuda_graphs true`).

What a graph fixes at capture, the caller must keep: the batch's shapes, dtypes and device, the model's
structure and mode (train), and no host syncs or CPU-side randomness inside the step. The optimizer may update
the weights in place between steps (their addresses stay); it must not replace them.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from megalodon.data import Batch
from megalodon.ops.attention import launches_without_host_cost

# Looked up at each capture, so that tests can stand a CPU imitation in for it (tests/training/test_cuda_graphs.py).
make_graphed_callables = torch.cuda.make_graphed_callables


class _Loss(nn.Module):
    """loss_fn(model, *batch) under autocast, as one module for make_graphed_callables."""

    def __init__(self, model: nn.Module, loss_fn: Callable, autocast_dtype: torch.dtype | None, device_type: str):
        super().__init__()
        self.model, self.loss_fn, self.autocast_dtype, self.device_type = model, loss_fn, autocast_dtype, device_type

    def forward(self, *batch: Tensor):
        if self.autocast_dtype is None:
            return self.loss_fn(self.model, *batch)
        # cache_enabled=False: make_graphed_callables requires it (a cached cast is state outside the graph)
        with torch.autocast(self.device_type, dtype=self.autocast_dtype, cache_enabled=False):
            return self.loss_fn(self.model, *batch)


def check_capturable(devices: set[torch.device], fix: str) -> None:
    """Refuse what cannot be captured, anything but one CUDA device, with the fix."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a CUDA GPU; on a CPU train eagerly (no --cuda_graphs, no graphed_loss)")
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise ValueError(f"a CUDA graph needs the model and the batch on one CUDA device, got "
                         f"{sorted(map(str, devices))}: {fix}")


class _OwnedGradients:
    """Makes a graphed backward add into .grad as an eager one does.

    The graph's backward hands out its static gradient buffers, which autograd may set as .grad as they are; the
    next replay would then overwrite them, and its gradients would be added to themselves. So before a replay
    any .grad not already copied out of the graph is copied out (once per optimizer step, and only when a second
    backward comes before zero_grad: gradient accumulation); from then on autograd adds into the copy in place."""

    def __init__(self, params: list[Tensor]):
        self.params = params
        self.owned: list[weakref.ref | None] = [None] * len(params)  # weak: a cleared .grad is freed

    def before_replay(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is not None and (self.owned[i] is None or self.owned[i]() is not p.grad):
                p.grad = p.grad.clone()
                self.owned[i] = weakref.ref(p.grad)


def graphed_loss(model: nn.Module, loss_fn: Callable, sample_batch: Sequence[Tensor],
                 autocast_dtype: torch.dtype | None = torch.bfloat16, warmup_steps: int = 3) -> Callable:
    """A function batch -> loss equal to loss_fn(model, *batch) under autocast(autocast_dtype), whose forward and
    backward replay CUDA graphs captured here from `sample_batch` (tensors on the model's GPU; their values do
    not matter, their shapes and dtypes are the only ones the function then takes). `loss.backward()` leaves
    the gradients in the parameters' .grad as an eager step does, adding to any already there (gradient
    accumulation). Call it outside autocast: the cast happens inside the graph. The warm-up runs `warmup_steps`
    forward and backward passes whose gradients are discarded; the random number generators are left as they were
    before the capture, so that the steps that follow draw what they would have drawn without it.

    Each call's backward must come before the next call: the graph's activations live in its buffers, which the
    next replay overwrites (a backward too late is refused). The loss returned is the caller's own; loss_fn may
    also return a tuple (loss, *tensors), the other tensors detached: the function then returns the tuple, each
    of those tensors a buffer of the graph that the next call overwrites (copy what must outlive it).

    The graphs and their memory pool go with a garbage collection after the last reference to the function: torch
    keeps them in a class of its own making, which only `gc.collect()` frees (before torch.cuda.empty_cache())."""
    devices = {p.device for p in model.parameters()} | {t.device for t in sample_batch}
    check_capturable(devices, "move them with .to('cuda') first")
    if not model.training:
        raise ValueError("graphed_loss captures a training step: call model.train() first (a graph keeps the "
                         "mode it was captured in)")
    device = next(iter(devices))
    if torch.is_autocast_enabled(device.type):
        raise RuntimeError("call graphed_loss outside torch.autocast: it applies autocast_dtype inside the graph, "
                           "where autocast's weight cache must be off")
    # launches_without_host_cost: a replay launches nothing from the host, so the attention may take its form of
    # least GPU work at any length (a long chunk's queries in blocks, ops/attention.py's query_blocks)
    on_device = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
    rng_devices = [device] if device.type == "cuda" else []
    # the graph's input buffers are the sample's own tensors, which each replay overwrites: give it copies
    sample = tuple(t.detach().clone() for t in sample_batch)
    with on_device, launches_without_host_cost(), torch.random.fork_rng(rng_devices), _capture_stream_warning_off():
        graphed = make_graphed_callables(_Loss(model, loss_fn, autocast_dtype, device.type), sample,
                                         num_warmup_iters=warmup_steps, allow_unused_input=True)
    _release_capture_graph(graphed.forward)
    gradients = _OwnedGradients([p for p in model.parameters() if p.requires_grad])
    calls = [0]

    def step(*batch: Tensor):
        if not model.training:  # (the replay checks the wrapper's mode, which model.eval() does not change)
            raise RuntimeError("graphed_loss replays a training step: model.eval() is set; evaluate eagerly, and "
                               "call model.train() before the next graphed step")
        gradients.before_replay()
        outputs = graphed(*batch)
        calls[0] += 1
        loss = (outputs[0] if isinstance(outputs, tuple) else outputs).clone()  # the buffer's next value is not ours
        if loss.requires_grad:
            loss.register_hook(_refuse_if_replayed_since(calls, calls[0]))
        return (loss, *outputs[1:]) if isinstance(outputs, tuple) else loss

    return step


@contextmanager
def _capture_stream_warning_off():
    """torch's AccumulateGrad stream-mismatch warning off during make_graphed_callables, whose last warm-up pass
    (on a side stream of its own) stays alive through the capture (on another), a mismatch of torch's making that
    the capture survives; a warning spent there (once a process) would hide one from the replays, which
    _release_capture_graph's release is there to prevent."""
    enabled = getattr(torch._C, "_warn_on_accumulate_grad_stream_mismatch", None)
    if enabled is None:  # a torch without the warning
        yield
        return
    was = enabled()
    torch._C._set_warn_on_accumulate_grad_stream_mismatch(False)
    try:
        yield
    finally:
        torch._C._set_warn_on_accumulate_grad_stream_mismatch(was)


def _release_capture_graph(forward: Callable) -> int:
    """Detach, in place, the capture's outputs that make_graphed_callables keeps in its closures (the module's
    forward -> the graphed function -> its autograd.Function -> that Function's forward), with the capture's
    autograd graph hanging from them. That graph holds the parameters' AccumulateGrad nodes, made on the capture's
    side streams, which every replay's backward then met from the default stream: torch's "The AccumulateGrad
    node's stream does not match..." warning (on the H200) and a wait between streams for each parameter. A replay
    needs none of it: its forward returns detached copies, its backward the static gradients. Returns how many
    outputs it detached."""
    released, seen, todo = 0, set(), [forward]
    for _ in range(8):  # the chain above is seven links long, from forward to the outputs
        found = []
        for obj in todo:
            if id(obj) in seen or isinstance(obj, nn.Module):
                continue
            seen.add(id(obj))
            if isinstance(obj, Tensor):
                if obj.grad_fn is not None:
                    obj.detach_()
                    released += 1
            elif isinstance(obj, (tuple, list)):
                found.extend(obj)
            elif isinstance(obj, type) and issubclass(obj, torch.autograd.Function):
                found.append(obj.forward)
            elif inspect.isfunction(obj):
                found.extend(_contents(cell) for cell in obj.__closure__ or ())
        todo = found
    return released


def _contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet filled
        return None


def _refuse_if_replayed_since(calls: list[int], call: int) -> Callable[[Tensor], None]:
    def check(_: Tensor) -> None:
        if calls[0] != call:
            raise RuntimeError(f"a graphed step's backward ran after {calls[0] - call} later call(s), whose replays "
                               "overwrote the activations it needs: call backward on each loss before the next call")
    return check


class GraphedForwardLoss:
    """The trainer's forward_loss(model, batch, state, stateful) (training/compute.py) with its forward and
    backward replayed from CUDA graphs (`megalodon train --cuda_graphs true`): captured at the first call that
    can be, for the micro-batch's shape, which every later call has. The carried state goes in and out of the
    graph as tensors; what comes out is copied out of the graph's buffers (the next micro-batch's replay
    overwrites them). A stream's first window (no state yet: the model starts from its own prior, whose gradient
    the window takes) runs eagerly: `ready(state)` says which."""

    def __init__(self, forward_loss: Callable, autocast_dtype: torch.dtype | None, stateful: bool):
        self.forward_loss, self.autocast_dtype, self.stateful = forward_loss, autocast_dtype, stateful
        self.step: Callable | None = None
        self.template = None  # the state whose structure the graph's state tensors fill
        self.shapes: list | None = None  # the inputs' shapes and dtypes at capture

    @classmethod
    def for_run(cls, device: torch.device, distributed: bool, forward_loss: Callable,
                autocast_dtype: torch.dtype | None, stateful: bool) -> "GraphedForwardLoss":
        """The trainer's, after checking what a capture needs: one process, on a GPU."""
        if distributed:
            raise ValueError("--cuda_graphs true is for one process: a captured step cannot hold the collectives of "
                             "FSDP, DDP or chunk parallelism; drop it, or train on one GPU")
        check_capturable({device}, "train with --device cuda, or without --cuda_graphs")
        return cls(forward_loss, autocast_dtype, stateful)

    def ready(self, state) -> bool:
        return not self.stateful or state is not None

    def __call__(self, model: nn.Module, batch, state):
        inputs = (batch.input_ids, batch.labels, batch.doc_start, batch.continues, *_leaves(state))
        shapes = [(t.shape, t.dtype) for t in inputs]
        if self.step is None:
            self.template, self.shapes = state, shapes
            self.step = graphed_loss(model, self._loss, inputs, self.autocast_dtype)
        elif shapes != self.shapes:
            now, then = next((a, b) for a, b in zip(shapes, self.shapes) if a != b)
            raise ValueError(f"--cuda_graphs: a micro-batch (or its carried state) holds a {now} tensor where the step "
                             f"was captured with {then}; a graph replays one shape: train without --cuda_graphs")
        loss, *new_state = self.step(*inputs)
        return loss, _filled(self.template, [t.clone() for t in new_state]) if self.stateful else None

    def _loss(self, model: nn.Module, *tensors: Tensor):
        state = _filled(self.template, tensors[4:]) if self.stateful else None
        loss, new_state = self.forward_loss(model, Batch(*tensors[:4]), state, self.stateful)
        return (loss, *(t.detach() for t in _leaves(new_state)))


def _leaves(state) -> list[Tensor]:
    """A MegalodonState's tensors in the order of its map() (none for no state)."""
    leaves: list[Tensor] = []
    if state is not None:
        state.map(lambda t: leaves.append(t) or t)
    return leaves


def _filled(template, tensors: Sequence[Tensor]):
    """template's structure with `tensors` in the places _leaves(template) listed."""
    remaining = iter(tensors)
    return template.map(lambda _: next(remaining))
