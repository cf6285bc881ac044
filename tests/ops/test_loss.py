"""The next-token loss a block of tokens at a time (ops/loss.py) against the logits path, in float64 and in the
dtypes training uses, and through both models."""

import pytest
import torch
import torch.nn.functional as F
from helpers import requires_cuda, tiny_config

from megalodon import Megalodon
from megalodon.baseline import Llama, matched_llama_config
from megalodon.ops.loss import summed_cross_entropy, summed_cross_entropy_reference


def inputs(dtype, tokens=37, dim=12, vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen, dtype=torch.float64) * 0.3).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    targets[::5] = -100  # positions with no next token
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, **kwargs):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets, **kwargs)
    (loss * 0.3).backward()  # the trainer scales the summed loss: backward must carry the scale
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("block_tokens", [1, 8, 37, 64], ids=["one", "uneven", "whole", "beyond"])
def test_float64_equals_the_logits_path(block_tokens):
    hidden, weight, targets = inputs(torch.float64)
    want = loss_and_grads(summed_cross_entropy_reference, hidden, weight, targets)
    got = loss_and_grads(summed_cross_entropy, hidden, weight, targets, block_tokens=block_tokens)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_dtypes_round_as_the_logits_path(dtype):
    """hidden in the compute dtype and the weight in fp32 (the master weight, cast for the GEMMs), as under
    autocast: the loss in fp32 whatever the dtype, the weight's gradient in the weight's fp32."""
    hidden, weight, targets = inputs(torch.float64, tokens=64, dim=32, vocab=96)
    hidden = hidden.detach().to(dtype).requires_grad_()
    weight = weight.detach().float().requires_grad_()
    want = loss_and_grads(summed_cross_entropy_reference, hidden, weight, targets)
    got = loss_and_grads(summed_cross_entropy, hidden, weight, targets, block_tokens=24)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32 and got[1].dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the gradient rounds before the scale, not after
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def test_no_gradient_work_in_evaluation():
    """Under no_grad the loss alone: nothing is kept for backward."""
    hidden, weight, targets = inputs(torch.float64)
    with torch.no_grad():
        loss = summed_cross_entropy(hidden, weight, targets, block_tokens=8)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, summed_cross_entropy_reference(hidden, weight, targets).detach())


def test_no_logits_are_kept_for_backward():
    """What autograd keeps is the size of hidden plus the size of the weight, never tokens x vocabulary."""
    hidden, weight, targets = inputs(torch.float64, tokens=256, dim=8, vocab=512)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        summed_cross_entropy(hidden, weight, targets, block_tokens=32)
        summed_cross_entropy_reference(hidden, weight, targets)
    blocked, reference = sizes[:2], sizes[2:]
    assert sorted(blocked) == sorted([256 * 8, 512 * 8])
    assert max(reference) == 256 * 512


def test_bad_shapes_are_refused():
    hidden, weight, targets = inputs(torch.float64)
    with pytest.raises(ValueError, match="hidden \\(N, D\\), weight \\(V, D\\) and targets \\(N,\\)"):
        summed_cross_entropy(hidden, weight, targets[:-1])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="block_tokens must be a whole number >= 1"):
            summed_cross_entropy(hidden, weight, targets, block_tokens=bad)


def test_a_bf16_gradient_takes_the_loss_scale_unrounded():
    """The trainer scales the summed loss by 1 / labels, which bf16 cannot hold: the hidden state's gradient must
    be the unscaled one times the fp32 scale, rounded once (rounding the scale first is off by up to 0.4%)."""
    hidden, weight, targets = inputs(torch.float64, tokens=64, dim=32, vocab=96)
    hidden = hidden.detach().bfloat16().requires_grad_()
    scale = torch.tensor(1 / 32641, dtype=torch.float32)
    assert scale.bfloat16().float() != scale
    summed_cross_entropy(hidden, weight, targets).backward()
    unscaled, hidden.grad = hidden.grad, None
    (summed_cross_entropy(hidden, weight, targets) * scale).backward()
    torch.testing.assert_close(hidden.grad, (unscaled.float() * scale).bfloat16(), rtol=0, atol=0)


def test_second_derivatives_are_refused_not_wrong():
    """backward's gradients come from forward, without a graph: a second derivative through them would silently
    miss the softmax's curvature, so asking for one is an error."""
    hidden, weight, targets = inputs(torch.float64)
    with pytest.raises(RuntimeError, match="no second derivative .* without targets="):
        torch.autograd.grad(summed_cross_entropy(torch.tanh(hidden), weight, targets), hidden, create_graph=True)


def models(dtype=torch.float64):
    torch.manual_seed(0)
    config = tiny_config()
    return [Megalodon(config).to(dtype), Llama(matched_llama_config(config)).to(dtype)]


@pytest.mark.parametrize("index", [0, 1], ids=["megalodon", "llama"])
def test_models_return_the_summed_loss_of_their_logits(index):
    """model(ids, targets=...) against cross_entropy of model(ids): the loss and every gradient, with documents
    packed (doc_start) and positions without a target; and with the embedding tied to the head (Megalodon's
    share_emb), whose weight takes both gradients."""
    model, twin = models()[index], models()[index]
    vocab = 64
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    doc_start = torch.zeros_like(ids, dtype=torch.bool)
    doc_start[:, 0] = doc_start[1, 16] = True
    loss = model(ids, doc_start=doc_start, targets=targets)
    want = F.cross_entropy(twin(ids, doc_start=doc_start).flatten(0, 1), targets.flatten(), reduction="sum")
    (loss * 0.5).backward()
    (want * 0.5).backward()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_a_stream_returns_its_loss_and_state():
    model, twin = models()[0], models()[0]
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(2))
    _, state = model(ids[:, :16], return_state=True)
    loss, new_state = model(ids[:, 16:], state=state, return_state=True, targets=ids[:, 16:].roll(-1, 1))
    logits, want_state = twin(ids[:, 16:], state=state, return_state=True)
    torch.testing.assert_close(loss, F.cross_entropy(logits[0], ids[0, 16:].roll(-1, 0), reduction="sum"))
    for a, b in zip(new_state.tensors().values(), want_state.tensors().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("index", [0, 1], ids=["megalodon", "llama"])
def test_bad_targets_are_refused_with_the_fix(index):
    model = models(torch.float32)[index]
    ids = torch.randint(0, 64, (2, 16))
    with pytest.raises(TypeError, match="targets must be an int64 tensor"):
        model(ids, targets=ids.int())
    with pytest.raises(ValueError, match=r"targets must have the input's shape \(2, 16\)"):
        model(ids, targets=ids[:, 1:])
    with pytest.raises(ValueError, match="a target is out of range for 64 outputs"):
        model(ids, targets=ids + 64)
    if index == 0:
        with pytest.raises(ValueError, match="targets and logits_to_keep exclude each other"):
            model(ids, targets=ids, logits_to_keep=1)


@requires_cuda
def test_on_a_gpu_under_autocast_as_the_logits_path():
    """Both models on CUDA under bf16 autocast (the trainer's GPU step): targets= against cross_entropy of the
    logits, the loss and the gradients to bf16's rounding."""
    for model, twin in zip(models(torch.float32), models(torch.float32)):
        model, twin = model.cuda(), twin.cuda()
        ids = torch.randint(0, 64, (2, 32), device="cuda")
        targets = ids.roll(-1, 1)
        targets[:, -1] = -100
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, targets=targets)
            want = F.cross_entropy(twin(ids).flatten(0, 1), targets.flatten(), reduction="sum")
        loss.backward()
        want.backward()
        torch.testing.assert_close(loss, want, rtol=1e-3, atol=0)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            if q.grad is not None:
                scale = q.grad.abs().max().item()
                torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-2 * scale + 1e-8, msg=name)
