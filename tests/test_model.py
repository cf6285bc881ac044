"""Whole-model invariants: streaming split invariance, gradients through the state, resets, precision."""

import contextlib
import random

import pytest
import torch

from helpers import force_triton, requires_cuda, requires_triton, tiny_model
from megalodon import MegalodonState
from megalodon.ops.attention import dense_chunk_attention
from megalodon.ops.cema import cema_sequential
from megalodon.ops.timestep_norm import timestep_norm_sequential


def run_pieces(model, ids, sizes, detach=False):
    outs, state, start = [], None, 0
    for size in sizes:
        out, state = model(ids[:, start:start + size], state=state, return_state=True)
        if detach:
            state = state.detach()
        outs.append(out)
        start += size
    return torch.cat(outs, 1), state


def random_split(total, rng):
    sizes = []
    while total:
        size = min(total, rng.choice([1, 1, 2, 3, 5, 7, 8, 9, 17]))
        sizes.append(size)
        total -= size
    return sizes


@pytest.mark.parametrize("seed", range(4))
def test_split_invariance_fp32_random_splits(seed):
    rng = random.Random(seed)
    model = tiny_model(torch.float32, seed=seed, swiglu=bool(seed % 2), share_emb=seed >= 2)
    length = rng.randint(20, 45)
    ids = torch.randint(0, 64, (3, length), generator=torch.Generator().manual_seed(seed))
    full, full_state = model(ids, return_state=True)
    pieces, state = run_pieces(model, ids, random_split(length, rng))
    torch.testing.assert_close(pieces, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.final_norm.var, full_state.final_norm.var, rtol=1e-5, atol=1e-6)
    assert torch.equal(state.position, full_state.position)


def test_single_token_decode_equals_one_call_in_float64(model):
    ids = torch.randint(0, 64, (2, 19))
    full = model(ids)
    pieces, _ = run_pieces(model, ids, [1] * 19)
    torch.testing.assert_close(pieces, full, rtol=1e-10, atol=1e-10)


def test_gradients_through_the_state_at_batch_three(model):
    ids = torch.randint(0, 64, (3, 21))
    targets = torch.randint(0, 64, (3, 21))

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    model.zero_grad()
    loss_of(model(ids)).backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    streamed, _ = run_pieces(model, ids, [5, 11, 5])
    loss_of(streamed).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, full_grads[name], rtol=1e-7, atol=1e-9, msg=name)


def test_gradcheck_with_respect_to_incoming_state(model):
    ids = torch.randint(0, 64, (2, 11))
    _, state = model(ids[:, :5], return_state=True)
    state = state.detach()
    leaves = [state.layers[0].cema_h, state.layers[1].norm.mean, state.layers[1].norm.var,
              state.layers[0].k_cache, state.final_norm.mean]

    def fn(cema_h, mean, var, k_cache, final_mean):
        s = state.clone()
        s.layers[0].cema_h = cema_h
        s.layers[1].norm = s.layers[1].norm._replace(mean=mean, var=var)
        s.layers[0].k_cache = k_cache
        s.final_norm = s.final_norm._replace(mean=final_mean)
        return model(ids[:, 5:], state=s)[..., :5]

    inputs = tuple(t.clone().requires_grad_(True) for t in leaves)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


def test_document_packed_after_another_equals_alone():
    model = tiny_model(torch.float64)
    doc = torch.randint(0, 64, (1, 13))
    alone = model(doc)
    for offset in (8, 16, 24):  # previous documents end anywhere; the next starts on the chunk grid
        ids = torch.cat([torch.randint(0, 64, (1, offset)), doc, torch.randint(0, 64, (1, 5))], 1)
        doc_start = torch.zeros_like(ids, dtype=torch.bool)
        doc_start[0, 0] = doc_start[0, offset] = True
        packed = model(ids, doc_start=doc_start)
        torch.testing.assert_close(packed[:, offset:offset + 13], alone, rtol=1e-10, atol=1e-10)


def test_reset_discards_an_incoming_state():
    model = tiny_model(torch.float64)
    ids = torch.randint(0, 64, (2, 16))
    _, state = model(torch.randint(0, 64, (2, 8)), return_state=True)
    doc_start = torch.zeros(2, 16, dtype=torch.bool)
    doc_start[0, 0] = True
    out = model(ids, state=state, doc_start=doc_start)
    torch.testing.assert_close(out[:1], model(ids[:1]), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out[1:], model(ids[1:]))


def test_rows_at_different_fills_decode_like_alone():
    model = tiny_model(torch.float64)
    prompts = [torch.randint(0, 64, (1, n)) for n in (3, 10, 6)]
    continuation = torch.randint(0, 64, (3, 7))
    states = [model(p, return_state=True)[1] for p in prompts]
    state = MegalodonState.stack(states)
    outs = []
    for t in range(7):
        out, state = model(continuation[:, t:t + 1], state=state, return_state=True)
        outs.append(out)
    batched = torch.cat(outs, 1)
    for row, prompt in enumerate(prompts):
        alone = model(torch.cat([prompt, continuation[row:row + 1]], 1))[:, prompt.shape[1]:]
        torch.testing.assert_close(batched[row:row + 1], alone, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="different positions"):
        model(continuation[:, :2], state=state)


def test_bf16_autocast_is_close_to_fp32_and_state_stays_fp32():
    model = tiny_model(torch.float32)
    ids = torch.randint(0, 64, (2, 30))
    ref = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = model(ids, return_state=True)
    assert out.dtype == torch.float32
    assert state.layers[0].cema_h.dtype == torch.complex64
    # the norm statistics are float64 at any compute dtype (a stream's running statistics, ops/timestep_norm.py)
    assert state.layers[0].norm.var.dtype == torch.float64 and state.final_norm.mean.dtype == torch.float64
    # bf16 has 8 mantissa bits; logits of order 1 drift by a few percent at most.
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_state_size_does_not_depend_on_position():
    model = tiny_model(torch.float32)
    chunk = model.config.chunk_size
    _, early = model(torch.randint(0, 64, (2, chunk + 3)), return_state=True)
    _, late = model(torch.randint(0, 64, (2, 40 * chunk + 3)), return_state=True)
    assert early.nbytes == late.nbytes
    _, fullest = model(torch.randint(0, 64, (2, chunk - 1)), return_state=True)
    for length in range(1, 3 * chunk):
        _, state = model(torch.randint(0, 64, (2, length)), return_state=True)
        assert state.nbytes <= fullest.nbytes


def test_dropout_changes_training_outputs_only():
    model = tiny_model(torch.float32, dropout=0.1, attention_dropout=0.1, hidden_dropout=0.1)
    ids = torch.randint(0, 64, (2, 20))
    assert torch.equal(model(ids), model(ids))
    model.train()
    assert not torch.equal(model(ids), model(ids))


def test_logits_to_keep_projects_only_the_tail(model):
    ids = torch.randint(0, 64, (2, 13))
    full, state = model(ids, return_state=True)
    tail, tail_state = model(ids, return_state=True, logits_to_keep=3)
    assert tail.shape == (2, 3, 64)
    torch.testing.assert_close(tail, full[:, -3:])
    assert torch.equal(tail_state.final_norm.var, state.final_norm.var)


def literal_forward(model, ids):
    """The spec's sections 3-11 read literally, in float64, from the slow references of ops/: the per-token
    TimestepNorm loop, the CEMA recurrence, dense attention with a block-diagonal mask, RoPE as complex numbers,
    and plain matmuls (no fused projections, no custom autograd)."""
    cfg = model.config
    batch, length = ids.shape
    eps, dz, chunk = cfg.norm_eps, cfg.head_z_dim, cfg.chunk_size

    def norm(t, tn):
        return timestep_norm_sequential(t, tn.initial_state(batch), tn.weight, tn.bias, eps)[0]

    def linear(t, layer):
        return t @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    def rope(t):
        angle = (torch.arange(length) % chunk)[:, None, None].double() * model.rope.freqs.double()
        rotated = torch.complex(t[..., 0::2], t[..., 1::2]) * torch.exp(1j * angle)
        return torch.view_as_real(rotated).flatten(-2)

    x = model.embed(ids) * (cfg.model_dim ** 0.5 if cfg.scale_emb else 1.0)
    for block in model.layers:
        mega, ffn = block.mega, block.nffn
        xn = norm(x, mega.timenorm)
        c, _ = cema_sequential(xn.transpose(1, 2), mega.cema.coefficients(), mega.cema.omega.squeeze(-1))
        c = c.transpose(1, 2)
        mx = c * torch.rsqrt(c.square().mean(-1, keepdim=True) + eps)
        if mega.rmsnorm.weight is not None:
            mx = mx * (mega.rmsnorm.weight + 1)
        z = linear(mx, mega.wz).view(batch, length, -1, dz)
        z = (z * torch.rsqrt(z.square().mean(-1, keepdim=True) + eps)).flatten(-2)
        q = (z * (mega.gamma[0] + 1) / dz ** 0.5 + mega.beta[0]).view(batch, length, -1, dz)
        k = (z * (mega.gamma[1] + 1) / dz ** 0.5 + mega.beta[1]).view(batch, length, -1, dz)
        v = torch.nn.functional.silu(linear(xn, mega.wv)).view(batch, length, q.shape[2], -1)
        r = torch.nn.functional.silu(linear(mx, mega.wr))
        attn = dense_chunk_attention(rope(q), rope(k), v, chunk).reshape(batch, length, -1)
        y = linear(mx, mega.wh1) + linear(attn * r, mega.wh2) + x
        u = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + eps)
        if ffn.norm.weight is not None:
            u = u * (ffn.norm.weight + 1) + ffn.norm.bias
        hidden = torch.nn.functional.silu(linear(u, ffn.fc1))
        if ffn.fc3 is not None:
            hidden = hidden * linear(u, ffn.fc3)
        out = linear(hidden, ffn.fc2)
        x = (out * ffn.alpha if ffn.alpha is not None else out) + x
    return linear(norm(x, model.output.final_norm), model.output.output)


@pytest.mark.parametrize("overrides, length", [
    (dict(), 21),  # two chunks and a partial one; the fused Wz/Wr/Wh1 GEMM
    (dict(swiglu=True, share_emb=True, scale_emb=True), 5),  # a partial chunk alone; three GEMMs (few tokens)
    (dict(norm_affine=False, rescale_nffn=True, num_heads=1), 16),
])
def test_float64_model_equals_the_literal_spec_with_gradients(overrides, length):
    """Every fast path in float64 stays float64 (no fp32 cast of gamma/beta: issue 12 item 5), to 1e-12."""
    model = tiny_model(torch.float64, **overrides).train()
    ids = torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(length))
    params = [p for _, p in model.named_parameters()]
    got, want = model(ids), literal_forward(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weight = torch.randn(got.shape, dtype=torch.float64)
    for name, a, b in zip([n for n, _ in model.named_parameters()],
                          torch.autograd.grad((got * weight).sum(), params),
                          torch.autograd.grad((want * weight).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_training_calls_never_wait_for_the_device(monkeypatch):
    """On the meta device every read of a value on the host (.item(), bool(), int(), nonzero) raises, so a
    forward and backward that run there ask the device nothing: a fresh call with packed documents, and a call
    from a carried state. (autocast does not know the meta device: the layers' autocast-off blocks are no-ops.)"""
    real_autocast = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda device_type, *args, **kwargs: contextlib.nullcontext()
                        if device_type == "meta" else real_autocast(device_type, *args, **kwargs))
    model = tiny_model(torch.float32).train()
    _, state = model(torch.randint(0, 64, (2, 16)), return_state=True)  # on the chunk grid: resets allowed
    _, mid_chunk = model(torch.randint(0, 64, (2, 13)), return_state=True)  # a partial chunk in the caches
    model.to("meta")
    ids = torch.randint(0, 64, (2, 21)).to("meta")
    doc_start = torch.zeros(2, 21, dtype=torch.bool)
    doc_start[:, 0] = doc_start[1, 8] = True
    model(ids, doc_start=doc_start.to("meta")).sum().backward()
    logits, new_state = model(ids, state=state.detach().to("meta"), doc_start=doc_start.to("meta"),
                              return_state=True)
    (logits.sum() + new_state.layers[0].cema_h.real.sum()).backward()
    model(ids, state=mid_chunk.detach().to("meta")).sum().backward()


def training_batch(device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """ids (2, 40) and doc_start with a second document starting mid-sequence in row 1 (on the chunk grid)."""
    ids = torch.randint(0, 64, (2, 40), device=device)
    doc_start = torch.zeros(2, 40, dtype=torch.bool, device=device)
    doc_start[:, 0] = doc_start[1, 16] = True
    return ids, doc_start


def compiled_against_eager(model, device="cpu", compile=lambda model: model.compile_blocks(fullgraph=True),
                           carry_state=False, autocast_dtype=None):
    """Logits and gradients of a training call, eager then compiled (by default each block, with fullgraph),
    documents reset mid-sequence; they must agree. carry_state: the call continues row 0's stream from a state,
    as the trainer's stateful windows do. autocast_dtype: both calls under autocast, as the trainer's bf16 runs;
    Inductor's fusions round differently from eager's kernels, so each tensor may differ from eager's by 2% of its
    largest magnitude plus as much as eager's own autocast call differs from its fp32 call (on an H200 a bf16 bias
    gradient, a sum that cancels, came out 2.6% off); a gradient path lost or doubled is off by its whole size."""
    ids, doc_start = training_batch(device)
    state = None
    if carry_state:
        with torch.no_grad():
            _, state = model(torch.randint(0, 64, (2, 16), device=device), return_state=True)
        doc_start[0, 0] = False
    runner = model

    def step(autocast_dtype=autocast_dtype):
        model.zero_grad()
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = runner(ids, state=state, doc_start=doc_start).float()
        logits.square().mean().backward()
        return {"logits": logits.detach()} | {name: p.grad.clone() for name, p in model.named_parameters()}

    eager = step()
    exact = step(None) if autocast_dtype is not None else None
    torch._dynamo.reset()
    runner = compile(model)
    compiled = step()
    if autocast_dtype is not None:
        for name, expected in eager.items():
            rounding = (expected - exact[name]).abs().max().item()
            error = (compiled[name] - expected).abs().max().item()
            assert error <= 0.02 * expected.abs().max().item() + rounding, name
        return
    torch.testing.assert_close(compiled.pop("logits"), eager.pop("logits"), rtol=1e-4, atol=1e-4)
    for name, grad in compiled.items():
        # every gradient is compared: torch 2.11's compile once returned zeros through a custom Function
        torch.testing.assert_close(grad, eager[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
def test_compile_blocks_matches_eager_with_gradients():
    """Each block and the final norm compile as one graph (fullgraph: no graph break, no host sync) with
    Inductor, and training through them gives eager's logits and gradients. One layer keeps it to a compile."""
    compiled_against_eager(tiny_model(torch.float32, num_layers=1).train())


def test_the_whole_model_compiles_as_one_graph_with_a_carried_state():
    """torch.compile(model) as users write it, continuing a stream: one graph (no check at the boundary breaks
    it), with eager's logits and gradients. Through AOTAutograd without Inductor's code generation (the graph and
    its gradients are what this test is about; the test above runs Inductor on a block, which took 1.5 minutes
    on 2 cores with a cold cache, and the whole model as much again)."""
    compiled_against_eager(tiny_model(torch.float32, num_layers=1).train(),
                           compile=lambda model: torch.compile(model, backend="aot_eager", fullgraph=True),
                           carry_state=True)


@pytest.mark.slow
@requires_triton
def test_compiled_blocks_hold_the_triton_kernels(monkeypatch):
    """As on a GPU, the Triton custom ops (the CEMA scan, the TimestepNorm, the queries and keys and the attention's
    softmax, forward and backward, here under the interpreter) sit inside the compiled block graphs beside
    F.rms_norm, and training through them gives eager's gradients."""
    force_triton(monkeypatch, compiled=True)
    compiled_against_eager(tiny_model(torch.float32, num_layers=1).train())


@pytest.mark.slow
@requires_triton
def test_compiled_blocks_under_bf16_autocast_keep_every_gradient_path(monkeypatch):
    """bf16 autocast, as the GPU benchmark trains: the kernels then also write the TimestepNorm's bf16 copy for Wv
    and take its gradient inside their backward, and the compiled graph must route that gradient to them as eager
    autograd does."""
    force_triton(monkeypatch, compiled=True)
    compiled_against_eager(tiny_model(torch.float32, num_layers=1).train(), autocast_dtype=torch.bfloat16)


@requires_cuda
def test_compiled_blocks_on_cuda_match_eager():
    """On a GPU, every Triton kernel on: compiled training against eager training."""
    compiled_against_eager(tiny_model(torch.float32, num_layers=2).train().cuda(), device="cuda")
    compiled_against_eager(tiny_model(torch.float32, num_layers=2).train().cuda(), device="cuda",
                           autocast_dtype=torch.bfloat16)


@requires_cuda
def test_a_cuda_training_step_does_not_sync():
    """Forward (with document resets) and backward on a GPU never wait for the host: the checks run on the device
    (validation.require) and every shape is known without reading a tensor."""
    model = tiny_model(torch.float32).train().cuda()
    ids, doc_start = training_batch("cuda")
    model(ids, doc_start=doc_start).square().mean().backward()  # warm-up: lazy initializations, Triton JIT
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        model(ids, doc_start=doc_start).square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
