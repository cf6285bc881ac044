"""A linear that a library replaced or wrapped (a PEFT LoRA layer, a quantized linear) runs its own forward: the
fused paths, which read a plain nn.Linear's weight and multiply it themselves, must not read it as a bare weight
(layers/linears.py). A model with low-rank adapters on every linear of its layers gives the logits of the same
model with the adapters merged into the weights, in training calls (the loss of targets= too), streaming and
static decode, and every adapter gets its gradient; a model whose linears torch's dynamic quantization replaced
prefills and decodes."""

import copy
import warnings

import pytest
import torch
from torch import nn

from helpers import tiny_model
from megalodon.decode_state import DecodeState
from megalodon.inference.decoding import StaticDecoder

WRAPPED = {"mega": ("wz", "wv", "wr", "wh1", "wh2"), "nffn": ("fc1", "fc2", "fc3")}


class LowRankAdapted(nn.Module):
    """A stand-in for a PEFT LoRA layer: base(x) + x Aᵀ Bᵀ. Like PEFT's layers it shows the base layer's weight
    and bias as its own, which is what made reading `.weight` skip the adapter silently."""

    def __init__(self, base: nn.Linear, generator: torch.Generator, rank: int = 2):
        super().__init__()
        self.base = base
        options = dict(dtype=base.weight.dtype, generator=generator)
        self.a = nn.Parameter(0.3 * torch.randn(rank, base.in_features, **options))
        self.b = nn.Parameter(0.3 * torch.randn(base.out_features, rank, **options))

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        return self.base(x) + x @ self.a.t() @ self.b.t()

    def merged(self) -> nn.Linear:
        linear = copy.deepcopy(self.base)
        with torch.no_grad():
            linear.weight += self.b @ self.a
        return linear


def adapted_and_merged(swiglu: bool):
    """Adapters on every linear of the layers and on the head (untied: a tied head's gradient is the embedding's)."""
    model = tiny_model(torch.float64, swiglu=swiglu, share_emb=False)
    merged = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(5)
    model.output.output = LowRankAdapted(model.output.output, generator)
    merged.output.output = model.output.output.merged()
    for block, merged_block in zip(model.layers, merged.layers, strict=True):
        for part, names in WRAPPED.items():
            for name in names:
                base = getattr(getattr(block, part), name)
                if base is None:  # fc3 without SwiGLU
                    continue
                adapter = LowRankAdapted(base, generator)
                setattr(getattr(block, part), name, adapter)
                setattr(getattr(merged_block, part), name, adapter.merged())
    return model, merged


def ids_and_resets(length: int = 21):
    ids = torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(1))
    doc_start = torch.zeros(2, length, dtype=torch.bool)
    doc_start[1, 8] = True  # a document starting on the chunk grid
    return ids, doc_start


@pytest.mark.parametrize("swiglu", [False, True])
def test_training_calls_run_the_adapters_and_give_them_gradients(swiglu):
    model, merged = adapted_and_merged(swiglu)
    ids, doc_start = ids_and_resets()
    model.train(), merged.train()  # no dropout in this config: the gradient paths of training, deterministically
    logits = model(ids, doc_start=doc_start)
    expected = merged(ids, doc_start=doc_start)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    targets = torch.roll(ids, -1, 1)
    loss = model(ids, doc_start=doc_start, targets=targets)  # the wrapped head's logits, then cross_entropy
    torch.testing.assert_close(loss, merged(ids, doc_start=doc_start, targets=targets), rtol=1e-10, atol=0)
    (logits.square().mean() + loss).backward()
    expected.square().mean().backward()
    merged(ids, doc_start=doc_start, targets=targets).backward()
    adapters = 0
    for name, mine in model.named_modules():
        if isinstance(mine, LowRankAdapted):
            adapters += 1
            assert mine.a.grad.abs().max() > 0 and mine.b.grad.abs().max() > 0, name
            # d loss / d W is the merged weight's gradient, whatever the adapter adds
            theirs = merged.get_submodule(name)
            torch.testing.assert_close(mine.base.weight.grad, theirs.weight.grad, rtol=1e-8, atol=1e-12)
    assert adapters == len(model.layers) * (7 + swiglu) + 1


@pytest.mark.parametrize("swiglu", [False, True])
def test_streaming_and_static_decode_run_the_adapters(swiglu):
    model, merged = adapted_and_merged(swiglu)
    ids, _ = ids_and_resets()
    expected = merged(ids)
    logits, state = model(ids[:, :11], return_state=True)
    steps = [logits]
    for t in range(11, 14):  # one-token calls of forward
        logits, state = model(ids[:, t:t + 1], state=state, return_state=True)
        steps.append(logits)
    decoder = StaticDecoder(model, DecodeState.from_state(state, model.config))
    steps += [decoder.step(ids[:, t]).clone()[:, None] for t in range(14, 21)]  # decode_step_ on static buffers
    torch.testing.assert_close(torch.cat(steps, 1), expected, rtol=1e-10, atol=1e-10)


def test_dynamically_quantized_linears_prefill_and_decode():
    """torch.ao's dynamic int8 quantization (CPU inference) replaces every nn.Linear with a module whose weight is
    a method: the model runs them, in calls of many tokens and in static decode steps, which give the one-token
    forward calls' logits. (Not one call's: dynamic quantization scales each call's activations by their own
    range, so a split changes the roundings.)"""
    model = tiny_model(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    assert not isinstance(quantized.layers[0].mega.wz, nn.Linear)
    ids, _ = ids_and_resets()
    with torch.no_grad():
        logits, state = quantized(ids[:, :12], return_state=True)
        assert (logits - model(ids[:, :12])).abs().max() > 1e-3  # the int8 linears ran
        decoder = StaticDecoder(quantized, DecodeState.from_state(state, quantized.config))
        for t in range(12, 21):
            expected, state = quantized(ids[:, t:t + 1], state=state, return_state=True)
            torch.testing.assert_close(decoder.step(ids[:, t]), expected[:, 0], rtol=1e-5, atol=1e-5)
