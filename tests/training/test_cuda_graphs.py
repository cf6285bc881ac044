"""graphed_loss: a training step's forward and backward from CUDA graphs, against the same step run eagerly."""

import contextlib
import re
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import requires_cuda, tiny_config

from megalodon import Megalodon
from megalodon.baseline import Llama, matched_llama_config
from megalodon.training.cuda_graphs import graphed_loss


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
def test_refuses_to_add_to_gradients_left_from_a_step():
    model = both_models()[0].cuda()
    ids = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
    step = graphed_loss(model, next_token_loss, [ids])
    step(ids).backward()
    with pytest.raises(RuntimeError, match="zero_grad"):
        step(ids)
    model.zero_grad(set_to_none=True)
    step(ids).backward()


@requires_cuda
def test_refuses_eval_mode_and_an_outer_autocast():
    model = both_models()[0].cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
    with pytest.raises(ValueError, match="model.train"):
        graphed_loss(model, next_token_loss, [ids])
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="outside torch.autocast"):
        graphed_loss(model, next_token_loss, [ids])


@requires_cuda
def test_the_readme_example_runs():
    """README.md's graphed-step example, as written (tests/test_readme_commands.py runs the README's other blocks;
    this one needs a GPU)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"^  ```python\n(.*?)^  ```", readme, flags=re.M | re.S)]
    (example,) = [b for b in blocks if "graphed_loss(" in b]
    names = {}
    exec(compile(example, "README.md", "exec"), names)
    assert all(p.grad is None for p in names["model"].parameters())
