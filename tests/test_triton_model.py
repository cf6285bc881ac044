"""The whole model on its CUDA path, without a GPU: every Triton kernel forced on for CPU tensors (under the
interpreter, tests/conftest.py), against the same model on the PyTorch path. The kernels have their own tests
against the float64 references; these check the glue a GPU run would otherwise be the first to exercise: layouts,
dtypes, document resets, carried states and gradients through every layer."""

import pytest
import torch

from helpers import force_triton, requires_triton, tiny_model

pytestmark = requires_triton


def documents(batch: int, length: int) -> torch.Tensor:
    """doc_start with a second document in row 1 from position 16 (on the tiny model's 16-token chunk grid)."""
    doc_start = torch.zeros(batch, length, dtype=torch.bool)
    doc_start[:, 0] = True
    doc_start[1, 16] = True
    return doc_start


def training_call(model, ids, doc_start, state, dtype=None):
    """Logits, the final state and every gradient (parameters and the incoming state) of one call."""
    model.zero_grad()
    state = state.detach()
    leaves = [state.layers[0].cema_h, state.layers[0].norm.mean]
    for leaf in leaves:
        leaf.requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        logits, new_state = model(ids, state=state, doc_start=doc_start, return_state=True)
    last = new_state.layers[-1]
    loss = logits.float().square().mean() + torch.view_as_real(last.cema_h).square().sum() + last.norm.var.sum()
    # fp16 as the trainer runs it, with a scaled loss: unscaled, gradients of 1e-4 and less lose their digits in
    # fp16's subnormals; at 2**12 the largest (about 46) overflows it
    loss_scale = 2.0 ** 8 if dtype == torch.float16 else 1.0
    (loss * loss_scale).backward()
    grads = {name: p.grad / loss_scale for name, p in model.named_parameters()}
    grads.update({f"state.{i}": leaf.grad / loss_scale for i, leaf in enumerate(leaves)})
    return logits.detach().float(), new_state.detach(), grads


@pytest.mark.parametrize("dtype, prefill", [
    pytest.param(None, 16, id="documents-fp32"), pytest.param(None, 24, id="mid-chunk-fp32"),
    # in half precision only the documents case: mid-chunk adds nothing that depends on the dtype (the suite's time)
    pytest.param(torch.bfloat16, 16, id="documents-bf16-autocast"),
    pytest.param(torch.float16, 16, id="documents-fp16-autocast")])  # fp16: V100s and T4s (--dtype fp16)
def test_training_call_on_the_kernels_equals_the_pytorch_path(monkeypatch, dtype, prefill):
    """Continuing a stream (a carried state): from a chunk boundary with a document restarting mid-call, or from
    mid-chunk (where no document may start). The logits, the new state and the gradients of every parameter and
    of the incoming state agree."""
    model = tiny_model(torch.float32, chunk_size=16).train()
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        _, state = model(torch.randint(0, 64, (2, prefill)), return_state=True)
    doc_start = None
    if prefill % 16 == 0:
        doc_start = torch.zeros(2, 40, dtype=torch.bool)
        doc_start[1, 16] = True
    reference = training_call(model, ids, doc_start, state, dtype)
    calls = force_triton(monkeypatch)
    kernels = {"cema_scan", "timestep_norm_triton", "queries_keys_triton", "causal_softmax_fwd", "causal_softmax_bwd",
               "silu_gate", "silu_gate_backward"}
    result = training_call(model, ids, doc_start, state, dtype)
    assert kernels <= set(calls)

    # In bf16 the fp32 parts (CEMA, norm) agree to rounding, and a rounding that flips one bf16 value upstream can
    # move a logit or a gradient by a bf16 step (2**-7 relative) of its tensor's scale; a parameter's gradient sums
    # such products over tokens with two bf16 roundings on the way (z's norm, then q and k). bf16 is checked at
    # that resolution (2e-2: under 3 steps), fp16 (2**-10 a step) at 4e-3, fp32 (which tests the kernels) at 1e-4.
    tolerance = {None: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    scale = 1.0 if dtype is None else reference[0].abs().max().item()
    torch.testing.assert_close(result[0], reference[0], rtol=tolerance, atol=tolerance * scale)
    for index, (actual, wanted) in enumerate(zip(result[1].layers, reference[1].layers)):
        # The first layer's norm and CEMA see the same input on both paths. A later layer's input has been through
        # bf16 roundings that the paths make differently (the SiLU gate's kernel rounds its product once, torch's
        # ops twice), so in bf16 its fp32 states agree at that resolution.
        exact = dtype is None or index == 0
        for got, want, bound in ((actual.cema_h, wanted.cema_h, 1e-4), (actual.norm.mean, wanted.norm.mean, 1e-5),
                                 (actual.norm.var, wanted.norm.var, 1e-5)):
            bound = bound if exact else tolerance * want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=bound if exact else tolerance, atol=bound)
    torch.testing.assert_close(actual.k_cache.float(), wanted.k_cache.float(), rtol=tolerance, atol=tolerance)
    assert result[2].keys() == reference[2].keys()
    for name, grad in reference[2].items():
        scale = grad.abs().max().item() + 1e-6
        error = (result[2][name] - grad).abs().max().item()
        assert error <= tolerance * scale, f"{name}: error {error:.3g}, gradient scale {scale:.3g}"


def test_split_calls_on_the_kernels_equal_one_call(monkeypatch):
    """The streaming contract on the CUDA path: pieces with the state carried give one call's logits."""
    calls = force_triton(monkeypatch)
    model = tiny_model(torch.float32, chunk_size=16)
    ids = torch.randint(0, 64, (2, 45))
    doc_start = documents(2, 45)
    with torch.no_grad():
        whole = model(ids, doc_start=doc_start)
        pieces, state, start = [], None, 0
        for size in (5, 11, 1, 16, 12):
            logits, state = model(ids[:, start:start + size], state=state, doc_start=doc_start[:, start:start + size],
                                  return_state=True)
            pieces.append(logits)
            start += size
    assert {"cema_scan", "timestep_norm_triton", "queries_keys_triton", "causal_softmax_fwd", "norm_rows",
            "silu_gate"} <= set(calls)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_steps_on_the_kernels_equal_the_pytorch_forward(monkeypatch, dtype):
    """The decode path a GPU runs (the Triton step kernels, torch's fused RMSNorm, the decode constants) against
    the PyTorch path's one-call forward, rows at different fills, across a chunk boundary; with the weights in
    fp32, and in bf16 as `megalodon generate --dtype auto` loads them on a GPU (fp16 weights take the same kernels
    with the same code: 1.2e-3 of the scale, checked by hand)."""
    from megalodon import MegalodonState
    from megalodon.decode_state import DecodeState
    from megalodon.inference.decoding import StaticDecoder

    model = tiny_model(torch.float32, chunk_size=16).to(dtype)
    sequences = torch.randint(0, 64, (2, 40))
    lengths = [5, 16]
    with torch.no_grad():
        full = [model(s[None])[0] for s in sequences]
        state = MegalodonState.stack([model(s[None, :n], return_state=True)[1] for s, n in zip(sequences, lengths)])
    calls = force_triton(monkeypatch)
    decoder = StaticDecoder(model, DecodeState.from_state(state, model.config))
    for t in range(20):
        ids = torch.stack([s[n + t] for s, n in zip(sequences, lengths)])
        logits = decoder.step(ids)
        for row, n in enumerate(lengths):
            # in bf16 weights the two paths round differently: measured 8e-3 of the scale
            tolerance = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
            scale = 1.0 if dtype == torch.float32 else full[row].abs().max().item()
            torch.testing.assert_close(logits[row], full[row][n + t], rtol=tolerance, atol=tolerance * scale)
    # and the step kernels of the norm and the CEMA, not the training entry points; the GEMMs into the residual
    assert set(calls) == {"queries_keys_triton", "write_and_attend_triton", "norm_rows", "silu_gate", "add_linear"}
