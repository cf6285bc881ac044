"""What a CUDA graph cannot capture, checked without a GPU, at the GPU benchmark's own widths and lengths.

A graphed training step (training/cuda_graphs.py) or decode step (inference/decoding.py) replays kernels and
nothing else: a host tensor copied to the device, or a CPU tensor met by a device op, fails the capture, and
outside a graph makes the host wait. Here the GPU's code path runs on the meta device: every Triton launcher runs
and allocates as it does on a GPU, with the launch itself stubbed, so that mega200M's layers at 4K cost nothing.
Meta refuses a CPU tensor in a device op and a value read (`.item()`); `_RefuseHostTensors` refuses a copy
from the host. tests/test_host_syncs.py runs the same calls on real values at tiny widths."""

import contextlib
import importlib
import pkgutil

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from helpers import force_triton
from megalodon import Megalodon, MegalodonConfig, MegalodonState
from megalodon.baseline import Llama, matched_llama_config
from megalodon.decode_state import DecodeState
from megalodon.ops.attention import launches_without_host_cost
from megalodon.training.models import apply_activation_checkpointing

aten = torch.ops.aten
COPIES = {aten._to_copy.default, aten.copy_.default, aten.copy.default, aten.lift_fresh_copy.default}


class _RefuseHostTensors(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        out = func(*args, **(kwargs or {}))
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if any(t.device.type == "meta" for t in inputs + outputs):
            # a CPU scalar is a kernel argument on CUDA too; anything else from the host is a copy
            host = [t for t in inputs if t.device.type == "cpu" and (t.dim() > 0 or func in COPIES)]
            if host:
                raise AssertionError(f"{func} takes a host tensor into a device computation "
                                     f"{[(t.device.type, tuple(t.shape)) for t in inputs]}")
        return out


@pytest.fixture
def on_meta(monkeypatch):
    """The GPU's code path for meta tensors, its kernel launches stubbed and recorded by name."""
    force_triton(monkeypatch)  # skips without triton
    import triton

    import megalodon.ops.triton as package

    launched = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, kernel in vars(module).items():
            if isinstance(kernel, triton.runtime.jit.KernelInterface) and hasattr(kernel, "run"):
                monkeypatch.setattr(kernel, "run", lambda *args, _name=name, **kwargs: launched.add(_name))
    autocast = torch.autocast  # meta has no autocast; the layers turn it off around their fp32 statistics
    monkeypatch.setattr(torch, "autocast", lambda device_type, *args, **kwargs: contextlib.nullcontext()
                        if device_type == "meta" else autocast(device_type, *args, **kwargs))
    return launched


def meta_megalodon(preset: str, dtype: torch.dtype, num_layers: int = 2) -> Megalodon:
    config = MegalodonConfig.from_preset(preset, num_layers=num_layers, vocab_size=512)
    with torch.device("meta"):
        return Megalodon(config).to(dtype)


def train_step(model, length: int, **kwargs) -> None:
    """Forward, the next-token loss and backward, as bench_gpu.py's and the trainer's steps run them."""
    ids = torch.randint(0, 512, (1, length), device="meta")
    with _RefuseHostTensors():
        out = model(ids, **kwargs)
        logits = out if isinstance(out, torch.Tensor) else out[0]
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()


def test_the_detector_refuses_host_tensors(on_meta):
    device = torch.ones(3, device="meta")
    with pytest.raises(AssertionError, match="host tensor"), _RefuseHostTensors():
        torch.tensor([1.0, 2.0]).to("meta")
    with pytest.raises(AssertionError, match="host tensor"), _RefuseHostTensors():
        torch.tensor(2.0).to("meta")  # a scalar copied is still a copy
    with pytest.raises((AssertionError, RuntimeError)), _RefuseHostTensors():
        device + torch.ones(3)
    with _RefuseHostTensors():
        device * torch.tensor(2.0)  # a CPU scalar as an operand: a kernel argument, as on CUDA


GPU_TRAINING_KERNELS = {"local_states_kernel", "scan_kernel", "outputs_kernel", "parameter_grads_kernel",
                        "normalize_kernel", "norm_bwd_kernel", "qk_fwd_kernel", "silu_gate_kernel"}


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_megalodon_training_step_takes_no_host_tensor(on_meta, graphed, dtype):
    """mega200M's widths at 4K, documents packed, as bench_gpu.py times them; graphed: the forms a CUDA-graph
    step takes (the attention's query blocks). bf16: the weights themselves (meta has no autocast), which takes
    the kernels' bf16 branches."""
    model = meta_megalodon("mega200M", dtype).train()
    doc_start = torch.zeros(1, 4096, dtype=torch.bool, device="meta")
    with launches_without_host_cost() if graphed else contextlib.nullcontext():
        train_step(model, 4096, doc_start=doc_start)
    assert GPU_TRAINING_KERNELS <= on_meta, "the step did not take the GPU's code path"
    assert all(p.grad is not None for p in model.parameters())


def test_a_megalodon_step_from_a_carried_state_takes_no_host_tensor(on_meta):
    """The trainer's stateful long-document training: the state of the last window, detached, enters the next."""
    model = meta_megalodon("mega200M", torch.bfloat16).train()
    with torch.no_grad():
        _, state = model(torch.randint(0, 512, (1, 3000), device="meta"), return_state=True)
    train_step(model, 4096, state=state, return_state=True)
    assert GPU_TRAINING_KERNELS <= on_meta


def test_the_pytorch_cema_and_norm_paths_take_no_host_tensor(on_meta, monkeypatch):
    """gpu_tuning.py may turn the CEMA's and the TimestepNorm's kernels off for their PyTorch paths (chunked
    matmuls, cumulative sums), which a graphed step then captures: they must hold no host tensor either."""
    from megalodon.ops import cema as cema_ops
    from megalodon.ops import timestep_norm as norm_ops

    for module in (cema_ops, norm_ops):
        monkeypatch.setattr(module, "use_triton", lambda op, *tensors: op not in ("cema", "timestep_norm"))
    model = meta_megalodon("mega200M", torch.bfloat16).train()
    doc_start = torch.zeros(1, 4096, dtype=torch.bool, device="meta")
    doc_start[0, 2048] = True
    with launches_without_host_cost():
        train_step(model, 4096, doc_start=doc_start)
    assert not {"local_states_kernel", "normalize_kernel"} & on_meta, "the Triton kernels ran"
    assert {"qk_fwd_kernel", "silu_gate_kernel"} <= on_meta
    assert all(p.grad is not None for p in model.parameters())


def test_the_trainers_graphed_step_takes_no_host_tensor(on_meta):
    """What `megalodon train --cuda_graphs true` captures (training/cuda_graphs.py's GraphedForwardLoss): the
    trainer's summed loss over labels with ignored positions, the carried state in and out as tensors."""
    from megalodon.training.compute import forward_loss
    from megalodon.training.cuda_graphs import GraphedForwardLoss, _leaves

    model = meta_megalodon("mega200M", torch.bfloat16).train()
    with torch.no_grad():
        _, state = model(torch.randint(0, 512, (1, 2048), device="meta"), return_state=True)
    graphed = GraphedForwardLoss(forward_loss, None, stateful=True)
    graphed.template = state
    ids = torch.randint(0, 512, (1, 4096), device="meta")
    doc_start, continues = torch.zeros_like(ids, dtype=torch.bool), torch.ones(1, dtype=torch.bool, device="meta")
    with _RefuseHostTensors():
        loss, *new_state = graphed._loss(model, ids, ids, doc_start, continues, *_leaves(state))
        loss.backward()
    assert GPU_TRAINING_KERNELS <= on_meta
    assert len(new_state) == len(_leaves(state)) and not any(t.requires_grad for t in new_state)


def test_a_long_checkpointed_megalodon_step_takes_no_host_tensor(on_meta):
    """mega1.3B at 32K with each block recomputed in backward, as it fits one 80 GB GPU."""
    model = meta_megalodon("mega1.3B", torch.float32).train()
    apply_activation_checkpointing(model)
    train_step(model, 32768)
    assert GPU_TRAINING_KERNELS <= on_meta


def test_a_llama_training_step_takes_no_host_tensor(on_meta):
    config = matched_llama_config(MegalodonConfig.from_preset("mega200M", num_layers=2), vocab_size=512)
    with torch.device("meta"):
        model = Llama(config).train()
    doc_start = torch.zeros(1, 4096, dtype=torch.bool, device="meta")
    train_step(model, 4096)
    train_step(model, 4096, doc_start=doc_start)


def test_megalodon_decode_steps_take_no_host_tensor(on_meta):
    """Past a chunk boundary, from a state made by a prefill on the device."""
    model = meta_megalodon("mega200M", torch.bfloat16).eval()
    chunk = model.config.chunk_size
    with torch.no_grad():
        _, state = model(torch.randint(0, 512, (2, chunk - 2), device="meta"), return_state=True)
        # from_state checks the positions on the host, once before decoding: given them there, then moved
        counted = MegalodonState(state.layers, state.final_norm, torch.full((2,), chunk - 2))
        buffers = DecodeState.from_state(counted, model.config)
        buffers = DecodeState(buffers.layers, buffers.final_norm, state.position)
        ids, constants = torch.zeros(2, dtype=torch.int64, device="meta"), model.decode_constants()
        with _RefuseHostTensors():
            for _ in range(4):  # what StaticDecoder captures
                ids = model.decode_step_(ids, buffers, constants).argmax(-1)
    assert {"_cema_step_kernel", "_step_kernel", "slot_scores_kernel"} <= on_meta, "not the GPU's decode path"


def test_llama_decode_steps_take_no_host_tensor(on_meta):
    config = matched_llama_config("mega200M", vocab_size=512)
    with torch.device("meta"):
        model = Llama(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        _, past = model(torch.randint(0, 512, (2, 100), device="meta"), return_past=True)
        cache = model.static_cache(2, 128, past)
        ids = torch.zeros(2, dtype=torch.int64, device="meta")
        with _RefuseHostTensors():
            for _ in range(4):  # what StaticDecoder captures
                ids = model.decode_step_(ids, cache).argmax(-1)


@pytest.mark.parametrize("architecture", ["megalodon", "llama"])
def test_compiled_blocks_trace_whole_at_the_benchmarks_shape(on_meta, architecture):
    """train-compiled-graphed's blocks, both models': compiled with no graph break (fullgraph) at mega200M's widths
    (the matched Llama's) and 4K, on the GPU's code path and in the forms a graphed step takes; aot_eager traces
    forward and backward as Inductor would, without generating code for a device meta has not. (No dispatch mode
    here: dynamo refuses to trace under one.)"""
    traced = set()

    def aot_eager_recording(graph, example_inputs):
        traced.update(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    if architecture == "megalodon":
        model = meta_megalodon("mega200M", torch.bfloat16).train()
    else:
        with torch.device("meta"):
            model = Llama(matched_llama_config("mega200M", vocab_size=512)).to(torch.bfloat16).train()
    torch._dynamo.reset()  # no other test's compiled blocks counted against the recompile limit, nor these after
    model.compile_blocks(backend=aot_eager_recording, fullgraph=True)
    ids = torch.randint(0, 512, (1, 4096), device="meta")
    try:
        with launches_without_host_cost():
            logits = model(ids)
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    finally:
        torch._dynamo.reset()
    assert all(p.grad is not None for p in model.parameters())
    if architecture == "llama":
        return
    # the GPU's ops, each one node of the graph (their backward nodes are in AOTAutograd's backward graph)
    assert {"megalodon.cema_scan.default", "megalodon.timestep_norm_fwd.default", "megalodon.queries_keys_fwd.default",
            "megalodon.materialized_attention.default", "megalodon.gated_linear.default"} <= traced, sorted(traced)
