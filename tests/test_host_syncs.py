"""No host sync in a training call or a decode step, checked without a GPU (tests/host_syncs.py says how).

The GPU tests check the same with `torch.cuda.set_sync_debug_mode("error")`; these let CI catch a new sync before a
borrowed GPU does. transformers' generate() steps: tests/hf/test_generate.py."""

import pytest
import torch

from helpers import requires_triton, tiny_model
from host_syncs import gpu_code_path, no_host_syncs
from megalodon.baseline import Llama, LlamaConfig
from megalodon.decode_state import DecodeState
from megalodon.inference.decoding import StaticDecoder


@pytest.fixture
def device_path(monkeypatch):
    gpu_code_path(monkeypatch)


@pytest.mark.parametrize("read", [
    lambda t: t.sum().item(), lambda t: bool(t.any()), lambda t: int(t.max()), lambda t: t[t > 0],
    lambda t: t.nonzero(), lambda t: t.tolist(), lambda t: t.cpu(),
], ids=["item", "bool", "int", "mask-index", "nonzero", "tolist", "cpu"])
def test_the_detector_catches_each_kind_of_sync(read):
    """The mode must refuse these, or the tests below could not fail."""
    with pytest.raises(AssertionError, match="host wait"), no_host_syncs():
        read(torch.randn(4))


def test_host_reads_free_is_the_rule_of_every_value_check(device_path):
    """With the rule off, an out-of-range id skips the host's check and meets the device assertion, which on the
    CPU raises at once (on a GPU it stops the stream)."""
    model = tiny_model(torch.float32)
    with pytest.raises(RuntimeError, match="out of range"):
        model(torch.tensor([[1, 2, 64]]))


@requires_triton
@pytest.mark.parametrize("carried, dtype", [(False, None), (True, None), (False, torch.bfloat16)],
                         ids=["documents", "carried-state", "documents-bf16-autocast"])
def test_a_training_call_does_not_sync(device_path, carried, dtype):
    """Forward with document resets (or a carried state mid-chunk), then backward, as the trainer runs them."""
    model = tiny_model(torch.float32, chunk_size=16).train()
    ids = torch.randint(0, 64, (2, 40))
    state, doc_start = None, torch.zeros(2, 40, dtype=torch.bool)
    doc_start[:, 0] = doc_start[1, 16] = True
    if carried:
        with torch.no_grad():
            _, state = model(torch.randint(0, 64, (2, 24)), return_state=True)
        doc_start = None
    with no_host_syncs(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        logits, new_state = model(ids, state=state, doc_start=doc_start, return_state=True)
        logits.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@requires_triton
def test_megalodon_decode_steps_do_not_sync(device_path):
    """Rows at different positions, across a chunk boundary, eager and with the fused step kernels."""
    model = tiny_model(torch.float32, seed=9)
    with torch.no_grad():
        states = [model(torch.randint(0, 64, (1, n)), return_state=True)[1] for n in (3, 8, 13)]
    from megalodon import MegalodonState

    decoder = StaticDecoder(model, DecodeState.from_state(MegalodonState.stack(states), model.config))
    ids = torch.tensor([1, 2, 3])
    with no_host_syncs(), torch.no_grad():
        for _ in range(model.config.chunk_size + 1):
            ids = decoder.step(ids).argmax(-1)


def tiny_llama() -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, ffn_hidden_dim=48))


def test_a_llama_training_call_does_not_sync(device_path):
    """The baseline as bench_gpu.py times it, with packed documents too: a fair comparison needs both sync-free."""
    model = tiny_llama().train()
    ids, doc_start = torch.randint(0, 64, (2, 40)), torch.zeros(2, 40, dtype=torch.bool)
    doc_start[:, 0] = doc_start[1, 13] = True
    with no_host_syncs():
        model(ids).square().mean().backward()
        model(ids, doc_start=doc_start).square().mean().backward()


def test_llama_decode_steps_do_not_sync(device_path):
    model = tiny_llama().eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        _, past = model(ids[:, :4], return_past=True)
        decoder = StaticDecoder(model, model.static_cache(2, 16, past))
        step_ids = ids[:, 4]
        with no_host_syncs():
            for _ in range(6):
                step_ids = decoder.step(step_ids).argmax(-1)
