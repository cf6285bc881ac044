"""graphed_loss and the trainer's --cuda_graphs: a training step's forward and backward from CUDA graphs, against
the same steps run eagerly. Without a GPU, an imitation of torch.cuda.make_graphed_callables stands in for the
capture: it hands out outputs and parameter gradients in buffers that every call overwrites, as a graph's replay
does, so that what the callers must do about that (copy the carried state out, add gradients across micro-batches)
is checked on the CPU; on a GPU the same tests capture for real."""

import contextlib
import gc
import os
import re
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten
from helpers import CUDA_MARKS, requires_cuda, tiny_config

from megalodon import Megalodon
from megalodon.baseline import Llama, matched_llama_config
from megalodon.training import cuda_graphs
from megalodon.training.cuda_graphs import graphed_loss
from megalodon.training.trainer import train
from training_helpers import losses, strict_records


def next_token_loss(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def test_refuses_a_cpu_model_with_a_clear_error():
    model = Megalodon(tiny_config()).float()
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    error = RuntimeError if not torch.cuda.is_available() else ValueError
    with pytest.raises(error, match="CUDA"):
        graphed_loss(model, next_token_loss, [ids])


def both_models():
    torch.manual_seed(0)
    config = tiny_config()
    return [Megalodon(config), Llama(matched_llama_config(config))]


@requires_cuda
@pytest.mark.parametrize("index, dtype, compiled", [
    (0, None, False), (0, torch.bfloat16, False), (1, None, False), (1, torch.bfloat16, False),
    (0, torch.bfloat16, True),  # the blocks compiled first (bench_gpu.py's compiled-graphed mode)
], ids=["megalodon-fp32", "megalodon-bf16", "llama-fp32", "llama-bf16", "megalodon-bf16-compiled"])
def test_graphed_steps_equal_eager_steps(index, dtype, compiled):
    """Loss and every gradient of two consecutive steps on new ids (the graph copies them in), with an optimizer
    step between them that updates the weights in place, against the same steps run eagerly."""
    model = both_models()[index].cuda()
    twin = both_models()[index].cuda()
    twin.load_state_dict(model.state_dict())
    if compiled:
        model.compile_blocks()
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(s))
               for s in range(3)]
    step = graphed_loss(model, next_token_loss, [batches[0]], autocast_dtype=dtype)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    for ids in batches[1:]:
        loss = step(ids)
        loss.backward()
        with torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext():
            want = next_token_loss(twin, ids)
        want.backward()
        tolerance = 1e-5 if dtype is None else 2e-2
        torch.testing.assert_close(loss, want, rtol=tolerance, atol=tolerance)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            if q.grad is None:
                assert p.grad is None or not p.grad.any(), name
                continue
            scale = q.grad.abs().max().item()
            torch.testing.assert_close(p.grad, q.grad, rtol=tolerance, atol=tolerance * scale + 1e-12, msg=name)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


@requires_cuda
def test_refuses_eval_mode_and_an_outer_autocast():
    model = both_models()[0].cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
    with pytest.raises(ValueError, match="model.train"):
        graphed_loss(model, next_token_loss, [ids])
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="outside torch.autocast"):
        graphed_loss(model, next_token_loss, [ids])




def graphed_callables_imitation(module, sample_args, num_warmup_iters=3, allow_unused_input=False):
    """torch.cuda.make_graphed_callables on a CPU, as its callers see it (torch/cuda/graphs.py): the same warm-up
    passes; the sample's own tensors as the static inputs, into which each call copies its arguments (unless it
    passes those very tensors); outputs returned as buffers that each call overwrites; one set of activations,
    the latest call's, for backward (a graph's buffers); the parameters' gradients handed out in buffers of its
    own (autograd may keep them as .grad); the module returned with its forward replaced by one that replays
    while the module is in the mode it was captured in. It counts its calls."""
    params = tuple(module.parameters())
    trained = [p for p in params if p.requires_grad]
    static_inputs = list(sample_args)
    for _ in range(num_warmup_iters):
        outputs = [o for o in tree_flatten(module(*static_inputs))[0] if o.requires_grad]
        torch.autograd.grad(outputs, trained, [torch.ones_like(o) for o in outputs], allow_unused=True)
    output_buffers, spec = tree_flatten(module(*static_inputs))
    output_buffers = [o.detach().clone() for o in output_buffers]
    gradient_buffers = [torch.zeros_like(p) for p in trained]
    graph = {}  # the latest replay's activations: the graph's, which the next replay overwrites

    class Replayed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            for static, arg in zip(static_inputs, args):
                if static.data_ptr() != arg.data_ptr():
                    static.copy_(arg)
            with torch.enable_grad():
                graph["outputs"] = tree_flatten(original_forward(*static_inputs))[0]
            for buffer, output in zip(output_buffers, graph["outputs"]):
                buffer.copy_(output.detach())
            return tuple(b.detach() for b in output_buffers)

        @staticmethod
        @once_differentiable
        def backward(ctx, *grads):
            wanted = [(o, g) for o, g in zip(graph["outputs"], grads) if o.requires_grad]
            found = torch.autograd.grad([o for o, _ in wanted], trained, [g for _, g in wanted], allow_unused=True,
                                        retain_graph=True)  # a graph's backward can replay again
            for buffer, grad in zip(gradient_buffers, found):
                buffer.copy_(grad) if grad is not None else buffer.zero_()
            handed = iter(gradient_buffers)
            return (None,) * len(static_inputs) + tuple(next(handed).detach() if p.requires_grad else None
                                                        for p in params)

    captured_training, original_forward = module.training, module.forward

    replays = SimpleNamespace(calls=0, module=weakref.ref(module))  # (made must not keep the module alive)

    def forward(*args):
        if module.training != captured_training:
            return original_forward(*args)
        replays.calls += 1
        return tree_unflatten(list(Replayed.apply(*args, *params)), spec)

    made.append(replays)
    module.forward = forward  # a cycle, as torch's
    return module


made = []  # the imitation's replays, newest last


@pytest.fixture(params=["imitation", pytest.param("cuda", marks=CUDA_MARKS)])
def capture(request, monkeypatch):
    """The device the steps run on: the CPU with the imitation standing in for the capture, or a GPU."""
    if request.param == "cuda":
        return torch.device("cuda")
    monkeypatch.setattr(cuda_graphs, "make_graphed_callables", graphed_callables_imitation)
    monkeypatch.setattr(cuda_graphs, "check_capturable", lambda devices, fix: None)
    made.clear()
    return torch.device("cpu")


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # the example's bf16 autocast, on the CPU
def test_the_readme_example_runs(capture):
    """README.md's graphed-step example, as written on a GPU (tests/test_readme_commands.py runs the README's other
    blocks); on the CPU with its device names changed, under the imitation."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"^  ```python\n(.*?)^  ```", readme, flags=re.M | re.S)]
    (example,) = [b for b in blocks if "graphed_loss(" in b]
    if capture.type == "cpu":  # and seconds, not a minute: the tiny preset, small batches
        for gpu, cpu in {".cuda()": "", 'device="cuda"': 'device="cpu"', '"small"': '"tiny"', "(8, 1024)": "(2, 64)",
                         "range(10)": "range(3)"}.items():
            assert gpu in example, f"the README's example changed: update this test's {gpu!r}"
            example = example.replace(gpu, cpu)
    names = {}
    exec(compile(example, "README.md", "exec"), names)
    assert all(p.grad is None for p in names["model"].parameters())
    assert made or capture.type == "cuda"  # the steps replayed the imitation's graphs


def test_graphed_steps_add_their_gradients_as_eager_steps_do(capture):
    """Two graphed backwards before zero_grad (gradient accumulation), then a step after zero_grad(set_to_none=
    False): each time the gradients equal an eager twin's. A graph hands its gradients out in buffers that its next
    replay overwrites, so without the copy the second backward would add the new gradients to themselves."""
    model, twin = both_models()[0].to(capture).float(), both_models()[0].to(capture).float()
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(s)).to(capture)
               for s in range(4)]
    step = graphed_loss(model, next_token_loss, [batches[0]], autocast_dtype=None)
    for ids in batches[:2]:
        step(ids).backward()
        next_token_loss(twin, ids).backward()
    assert_same_gradients(model, twin)
    model.zero_grad(set_to_none=False)
    twin.zero_grad(set_to_none=False)
    step(batches[2]).backward()
    next_token_loss(twin, batches[2]).backward()
    assert_same_gradients(model, twin)


def test_what_a_caller_holds_is_its_own(capture):
    """The sample keeps its values (the graph reads its inputs from copies), and a loss keeps its value after the
    next call (the graph's output buffer does not)."""
    model = both_models()[0].to(capture).float()
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(s)).to(capture)
               for s in range(3)]
    first = batches[0].clone()
    step = graphed_loss(model, next_token_loss, batches[:1], autocast_dtype=None)
    losses = []
    for ids in batches:
        losses.append(step(ids))
        losses[-1].backward()
    assert torch.equal(batches[0], first)
    with torch.no_grad():
        want = [next_token_loss(model, ids) for ids in batches]
    torch.testing.assert_close(torch.stack(losses).detach(), torch.stack(want), rtol=1e-6, atol=0)
    assert len(set(torch.stack(losses).tolist())) == 3


def test_a_backward_after_a_later_call_is_refused_and_eval_mode_too(capture):
    """The graph keeps one call's activations: a backward after the next call would take that call's, so it is
    refused; model.eval() between steps (an evaluation) is refused too, where the replay would run the training
    graph (dropout on)."""
    model = both_models()[0].to(capture).float()
    ids = torch.randint(0, model.config.vocab_size, (2, 24)).to(capture)
    step = graphed_loss(model, next_token_loss, [ids], autocast_dtype=None)
    first, second = step(ids), step(ids)
    with pytest.raises(RuntimeError, match="1 later call.*before the next call"):
        first.backward()
    second.backward()
    model.eval()
    with pytest.raises(RuntimeError, match="model.eval\\(\\) is set.*model.train\\(\\)"):
        step(ids)
    model.train()
    step(ids).backward()


def assert_same_gradients(model, twin):
    """To the bit on the CPU (the imitation runs the eager step's ops in their order); on a GPU to rounding."""
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            tol = 0.0 if q.grad.device.type == "cpu" else 1e-5
            torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol * q.grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("arch", ["megalodon", "llama"])
def test_the_trainer_with_cuda_graphs_trains_as_it_does_eagerly(capture, arch, make_config, tmp_path):
    """megalodon train --cuda_graphs true against the same run without: every step's loss, two micro-batches a
    step whose carried states come out of the graph's buffers (the second's replay overwrites the first's), the
    first window of the streams run eagerly (the state starts from the model's prior) and the rest replayed.
    With dropout: the capture's warm-up draws random numbers, which it must give back."""
    cfg = dict(arch=arch, max_steps=4, checkpoint_every=0, model={"chunk_size": 16, "dropout": 0.1})
    train(make_config(**cfg, cuda_graphs="false"), tmp_path / "eager", progress=False, device=str(capture))
    train(make_config(**cfg, cuda_graphs="true"), tmp_path / "graphed", progress=False, device=str(capture))
    eager, graphed = losses(tmp_path / "eager"), losses(tmp_path / "graphed")
    assert len(eager) == 4
    torch.testing.assert_close(graphed, eager, rtol=0 if capture.type == "cpu" else 1e-4, atol=0)  # CPU: to the bit
    if capture.type == "cpu":  # the Llama carries no state: it replays from its first step
        assert [r.calls for r in made] == [8 - 2 * (arch == "megalodon")]


def test_fp16_steps_replay_and_skip_as_eager_ones(capture, make_config, tmp_path, monkeypatch):
    """--dtype fp16 with --cuda_graphs: fp16 autocast inside the graph, the loss scale applied to its loss outside
    it. From a scale of 2^20 the first steps overflow (tests/training/test_fp16.py) and are skipped, replayed or
    not; every loss and scale equals the eager run's."""
    from megalodon.training import loss_scaling

    monkeypatch.setattr(loss_scaling, "INITIAL_SCALE", 2.0 ** 20)
    cfg = dict(dtype="fp16", max_steps=5, checkpoint_every=0, model={"chunk_size": 16})
    runs = {}
    for name, graphs in (("eager", False), ("graphed", True)):
        train(make_config(**cfg, cuda_graphs=graphs), tmp_path / name, progress=False, device=str(capture))
        runs[name] = [(r["loss"], r["loss_scale"]) for r in strict_records(tmp_path / name / "metrics.jsonl")
                      if "loss" in r]
    scales = [scale for _, scale in runs["eager"]]
    assert scales[0] == 2.0 ** 20 and scales[-1] < scales[0]  # steps overflowed, and were skipped
    if capture.type == "cpu":
        assert scales == [2.0 ** 20, 2.0 ** 19, 2.0 ** 18, 2.0 ** 18, 2.0 ** 18]
    torch.testing.assert_close(runs["graphed"], runs["eager"], rtol=0 if capture.type == "cpu" else 1e-3, atol=0)
    if capture.type == "cpu":
        assert [r.calls for r in made] == [8]  # steps 2-5, two micro-batches each


def test_a_run_with_cuda_graphs_resumes_exactly(capture, make_config, tmp_path):
    """Stopped and resumed, the run captures again from the checkpoint's state and goes on as the run that was not
    stopped (dropout on: the capture leaves the random state as it found it)."""
    cfg = make_config(cuda_graphs=True, model={"chunk_size": 16, "dropout": 0.1})
    train(cfg, tmp_path / "straight", progress=False, device=str(capture))
    train(cfg, tmp_path / "resumed", progress=False, device=str(capture), stop_at_step=4)
    train(cfg, tmp_path / "resumed", resume=True, progress=False, device=str(capture))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(straight) == 8
    # to the bit on the CPU; a GPU's kernels may add in another order from one capture to the next
    torch.testing.assert_close(resumed, straight, rtol=0 if capture.type == "cpu" else 1e-5, atol=0)


def test_a_closed_trainer_lets_its_graphs_go_and_a_budget_is_timed_after_the_capture(capture, make_config,
                                                                                          tmp_path):
    """torch keeps a capture's graphs and memory pool in objects that only a garbage collection frees: the trainer
    drops its graphed step and collects when it closes (`megalodon compare` trains two models in one process). And
    a time budget is paced from the steps after the capture (a stream's first window runs eagerly, the second
    captures: warm-up passes and the capture, no steady step)."""
    from megalodon.training.trainer import Trainer

    gc.collect()
    gc.disable()  # only the trainer's own collection may free the graphs
    try:
        with Trainer(make_config(cuda_graphs=True, max_steps=0, time_budget_min=10, warmup_steps=50,
                                 model={"chunk_size": 16}), tmp_path / "run", progress=False,
                     device=str(capture)) as trainer:
            trainer.run(stop_at_step=4)
            assert trainer.time_budget.timed_from[0] == 2  # captured at step 2, timed from there
        if capture.type == "cpu":
            assert made and made[0].module() is None
    finally:
        gc.enable()


def test_a_micro_batch_of_another_shape_is_refused(capture):
    """A graph replays the shape it was captured with; another would be copied into it wrongly or fail deep in
    torch: the trainer's graphed step names the difference instead."""
    from megalodon.data import Batch
    from megalodon.training.compute import forward_loss

    model = both_models()[1].to(capture).float()
    graphed = cuda_graphs.GraphedForwardLoss(forward_loss, None, stateful=False)

    def batch(length):
        ids = torch.randint(0, model.config.vocab_size, (2, length), device=capture)
        return Batch(ids, ids, torch.zeros_like(ids, dtype=torch.bool), torch.ones(2, dtype=torch.bool, device=capture))

    graphed(model, batch(16), None)[0].backward()
    with pytest.raises(ValueError, match=r"torch.Size\(\[2, 32\]\).*captured with.*\[2, 16\]"):
        graphed(model, batch(32), None)


class _NoGraph:
    """torch.cuda.graph and CUDAGraph on a CPU: the body runs eagerly, a replay does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def replay(self):
        pass


def test_the_capture_keeps_no_autograd_graph(monkeypatch):
    """torch's own make_graphed_callables (its CUDA calls stood in for on the CPU) keeps the capture's outputs in
    its closures, and with them the capture's autograd graph, whose AccumulateGrad nodes (made on its side stream)
    every replay's backward would meet from the default stream: the stream-mismatch warning of the H200 run.
    graphed_loss detaches them, and then none is left. If torch's closures change shape, this fails: look there."""
    for name, stand_in in (("synchronize", lambda *a, **k: None), ("Stream", lambda *a, **k: None),
                           ("stream", lambda s: contextlib.nullcontext()), ("CUDAGraph", _NoGraph),
                           ("graph", _NoGraph)):
        monkeypatch.setattr(torch.cuda, name, stand_in)
    monkeypatch.setattr(torch.cuda.graphs, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(cuda_graphs, "check_capturable", lambda devices, fix: None)
    released = []
    release = cuda_graphs._release_capture_graph
    monkeypatch.setattr(cuda_graphs, "_release_capture_graph", lambda forward: released.append(release(forward)))
    model = nn.Linear(4, 1)
    step = graphed_loss(model, lambda model, x: model(x).square().mean(), [torch.randn(3, 4)], autocast_dtype=None)
    assert released == [1]  # the loss
    module = next(c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, cuda_graphs._Loss))
    assert release(module.forward) == 0


STREAM_WARNING_CHECK = """
import sys, warnings, torch
from megalodon.training.cuda_graphs import graphed_loss
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 1)).cuda()
    torch.nn.functional.mse_loss(model(torch.randn(4, 8, device="cuda")), torch.zeros(4, 1, device="cuda")).backward()
    step = graphed_loss(model, lambda model, x: model(x).square().mean(), [torch.randn(4, 8, device="cuda")])
    for _ in range(3):
        step(torch.randn(4, 8, device="cuda")).backward()
    torch.cuda.synchronize()
mismatches = [str(w.message) for w in seen if "AccumulateGrad node's stream" in str(w.message)]
sys.exit("; ".join(mismatches) or None)
"""


@requires_cuda
def test_replayed_steps_meet_no_accumulate_grad_node_of_another_stream():
    """On a GPU, a fresh process (torch warns once a process): an eager step, then graphed steps, without torch's
    AccumulateGrad stream-mismatch warning, which every graphed step raised before the capture's graph was
    released (H200, 2026-11-30)."""
    env = {**os.environ, "PYTHONPATH": str(Path(cuda_graphs.__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", STREAM_WARNING_CHECK], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_auto_takes_cuda_graphs_where_they_can_work(make_config):
    """--cuda_graphs auto (the default) on one CUDA GPU, not where a capture cannot hold the step; true and false
    as given; the true and false of configs and run directories written before auto, as those words."""
    from megalodon.training.compute import uses_cuda_graphs

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert make_config().cuda_graphs == "auto"
    assert uses_cuda_graphs(make_config(), gpu, distributed=False) == (torch.version.hip is None)
    assert not uses_cuda_graphs(make_config(), cpu, distributed=False)
    assert not uses_cuda_graphs(make_config(), gpu, distributed=True)
    assert not uses_cuda_graphs(make_config(activation_checkpointing=True), gpu, distributed=False)
    assert not uses_cuda_graphs(make_config(compile=True, compile_mode="reduce-overhead"), gpu, distributed=False)
    assert uses_cuda_graphs(make_config(compile=True), gpu, distributed=False) == (torch.version.hip is None)
    assert uses_cuda_graphs(make_config(cuda_graphs=True), cpu, distributed=False)  # for_run then refuses it
    assert not uses_cuda_graphs(make_config(cuda_graphs=False), gpu, distributed=False)
    assert make_config(cuda_graphs=True).cuda_graphs == "true" and make_config(cuda_graphs=False).cuda_graphs == "false"
    assert make_config(cuda_graphs="On").cuda_graphs == "true" and make_config(cuda_graphs="0").cuda_graphs == "false"
    with pytest.raises(ValueError, match="cuda_graphs must be one of \\('auto', 'true', 'false'\\)"):
        make_config(cuda_graphs="yes please")


def test_auto_trains_eagerly_where_the_capture_fails(make_config, tmp_path, monkeypatch, caplog):
    """A capture that fails under --cuda_graphs auto leaves the model as it was: the run goes on eagerly, with the
    eager run's losses to the bit, and says so; under --cuda_graphs true the failure ends the run."""
    from megalodon.training import trainer as trainer_module

    def failing(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    cfg = dict(max_steps=3, checkpoint_every=0, model={"chunk_size": 16})
    train(make_config(**cfg, cuda_graphs="false"), tmp_path / "eager", progress=False, device="cpu")
    monkeypatch.setattr(trainer_module, "uses_cuda_graphs", lambda cfg, device, distributed: True)
    monkeypatch.setattr(cuda_graphs, "check_capturable", lambda devices, fix: None)
    monkeypatch.setattr(cuda_graphs, "make_graphed_callables", failing)
    with caplog.at_level("WARNING", logger="megalodon"):
        train(make_config(**cfg), tmp_path / "auto", progress=False, device="cpu")
    assert losses(tmp_path / "auto") == losses(tmp_path / "eager")
    assert [r.message for r in caplog.records if "capturing the step failed" in r.message] == [
        "--cuda_graphs auto: capturing the step failed (RuntimeError: operation not permitted when stream is "
        "capturing); training eagerly (--cuda_graphs false skips the attempt, --cuda_graphs true makes it an error)"]
    with pytest.raises(RuntimeError, match="operation not permitted"):
        train(make_config(**cfg, cuda_graphs="true"), tmp_path / "true", progress=False, device="cpu")


def test_cuda_graphs_options_that_cannot_work_are_refused(make_config, tmp_path):
    with pytest.raises(ValueError, match="cuda_graphs must be false with compile_mode 'reduce-overhead'"):
        make_config(cuda_graphs=True, compile=True, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="cuda_graphs must be false with activation_checkpointing"):
        make_config(cuda_graphs=True, activation_checkpointing=True)
    with pytest.raises(ValueError, match="cuda_graphs must be false with several processes"):
        make_config(cuda_graphs=True, nproc=2)
    make_config(cuda_graphs=True, compile=True)  # the compiled blocks inside one graph: bench_gpu's compiled-graphed
    error = RuntimeError if not torch.cuda.is_available() else ValueError
    with pytest.raises(error, match="CUDA"):
        train(make_config(cuda_graphs=True), tmp_path / "cpu", progress=False, device="cpu")
