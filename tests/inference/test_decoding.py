"""The static decode path (decode_state.DecodeState, Megalodon.decode_step_, inference/decoding.StaticDecoder)
against the blocked forward pass, in float64: every position, rows at different fills, chunk boundaries, splits."""

import pytest
import torch

from helpers import force_fused_rms_norm, requires_cuda, requires_triton, tiny_model
from megalodon import MegalodonState
from megalodon.decode_state import DecodeState
from megalodon.inference.decoding import StaticDecoder, TokenReader

CHUNK = 8  # tiny_model's chunk_size
VOCAB = 64


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def stacked_prefill(model, prompts: list[torch.Tensor]) -> MegalodonState:
    """Each prompt prefilled alone (its own chunk grid), then stacked: rows at different fills."""
    return MegalodonState.stack([model(p[None], return_state=True)[1] for p in prompts])


@pytest.mark.parametrize("seed,overrides", [(0, {}), (1, {}), (2, {}),
                                            (3, dict(swiglu=True, scale_emb=True)), (4, dict(rescale_nffn=True))])
def test_decode_steps_equal_the_blocked_forward_at_every_position(seed, overrides):
    """Rows at different in-chunk fills (0 included) decode together across several chunk boundaries; each row's
    logits equal its own sequence's one-call forward at every position. The FFN's variants too (the gated
    product, embeddings scaled, the output rescaled), whose decode step adds into the hidden state in place."""
    model = tiny_model(seed=seed, **overrides)
    generator = torch.Generator().manual_seed(seed)
    lengths = [int(n) for n in torch.randint(1, 3 * CHUNK, (3,), generator=generator)] + [CHUNK]
    steps = 2 * CHUNK + 3
    sequences = [random_ids(1, n + steps, seed + 10 * b)[0] for b, n in enumerate(lengths)]
    state = DecodeState.from_state(stacked_prefill(model, [s[:n] for s, n in zip(sequences, lengths)]), model.config)
    decoder = StaticDecoder(model, state.clone())  # passes the CEMA constants computed once
    full = [model(s[None])[0] for s in sequences]  # L x V each
    for t in range(steps):
        ids = torch.stack([s[n + t] for s, n in zip(sequences, lengths)])
        logits = model.decode_step_(ids, state)  # computes them in the step
        for b, n in enumerate(lengths):
            torch.testing.assert_close(logits[b], full[b][n + t], rtol=0, atol=1e-10)
        torch.testing.assert_close(decoder.step(ids), logits, rtol=0, atol=0)
    assert state.position.tolist() == [n + steps for n in lengths]


@pytest.mark.parametrize("seed", [3, 4])
def test_decode_and_blocked_calls_interleave_like_one_call(seed):
    """Split invariance through both conversions: blocks, steps, blocks, steps... at random cuts equal one call."""
    model = tiny_model(seed=seed)
    ids = random_ids(2, 40, seed=seed)
    full = model(ids)
    inner = torch.randperm(39, generator=torch.Generator().manual_seed(seed))[:5] + 1
    cuts = [0, *sorted(inner.tolist()), 40]  # alternately a blocked call and decode steps
    state, outputs = None, []
    for i, (begin, end) in enumerate(zip(cuts, cuts[1:])):
        if i % 2 == 0:
            logits, state = model(ids[:, begin:end], state=state, return_state=True)
            outputs.append(logits)
        else:
            decode = DecodeState.from_state(state, model.config)
            outputs.append(torch.stack([model.decode_step_(ids[:, t], decode) for t in range(begin, end)], dim=1))
            state = decode.to_state()
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=0, atol=1e-10)
    assert state.position.tolist() == [40, 40]


def test_to_state_round_trips_and_pads_rows_at_different_fills():
    model = tiny_model(seed=4)
    state = stacked_prefill(model, [random_ids(1, n, seed=n)[0] for n in (3, 13, 16)])  # fills 3, 5, 0
    back = DecodeState.from_state(state, model.config).to_state()
    for name, tensor in state.tensors().items():
        assert torch.equal(back.tensors()[name], tensor), name
    assert back.layers[0].k_cache.shape[1] == 5  # the longest fill


def test_the_decode_state_is_static_and_updated_in_place():
    """The step writes into the same buffers (what a CUDA graph holds) and allocates none of the state."""
    model = tiny_model(seed=5)
    _, state = model(random_ids(2, 6, seed=5), return_state=True)
    decode = DecodeState.from_state(state, model.config)
    pointers = [t.data_ptr() for t in decode.tensors()]
    shapes = [t.shape for t in decode.tensors()]
    before = decode.clone()
    for t in range(2 * CHUNK):
        model.decode_step_(torch.tensor([t, t + 1]), decode)
    assert [t.data_ptr() for t in decode.tensors()] == pointers
    assert [t.shape for t in decode.tensors()] == shapes
    assert not torch.equal(decode.layers[0].cema_h, before.layers[0].cema_h)
    assert decode.layers[0].keys.shape[1] == CHUNK


def test_static_decoder_select_and_norm_replacement():
    model = tiny_model(seed=6)
    prompts = [random_ids(1, n, seed=n)[0] for n in (4, 7, 9)]
    decoder = StaticDecoder(model, DecodeState.from_state(stacked_prefill(model, prompts), model.config))
    first = torch.tensor([1, 2, 3])
    decoder.step(first)
    kept, second = [0, 2], torch.tensor([5, 6])
    decoder.select(kept)
    logits = decoder.step(second)
    for b, row in enumerate(kept):
        sequence = torch.cat([prompts[row], first[row:row + 1], second[b:b + 1]])
        torch.testing.assert_close(logits[b], model(sequence[None])[0, -1], rtol=0, atol=1e-10)
    fresh = model(random_ids(1, 3, seed=9), return_state=True)[1]
    decoder.state.replace_norm_stats_(1, fresh)
    assert torch.equal(decoder.state.layers[1].norm.mean[1], fresh.layers[1].norm.mean[0])
    assert torch.equal(decoder.state.final_norm.count[1], fresh.final_norm.count[0])


def test_reorder_takes_source_rows_in_place():
    """Beam search's reorder, in place (a CUDA graph keeps its buffers): row i continues old row rows[i]."""
    model = tiny_model(seed=8)
    prompts = [random_ids(1, n, seed=n)[0] for n in (4, 7, 9)]
    state = DecodeState.from_state(stacked_prefill(model, prompts), model.config)
    pointers = [t.data_ptr() for t in state.tensors()]
    rows = torch.tensor([2, 2, 0])
    expected = state.select(rows)
    state.reorder_(rows)
    assert [t.data_ptr() for t in state.tensors()] == pointers
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(state.tensors(), expected.tensors()))
    logits = model.decode_step_(torch.tensor([5, 6, 7]), state)
    for b, row in enumerate(rows.tolist()):
        sequence = torch.cat([prompts[row], torch.tensor([5 + b])])
        torch.testing.assert_close(logits[b], model(sequence[None])[0, -1], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="one source row per row"):
        state.reorder_(torch.tensor([0, 1]))


def test_bad_inputs_are_refused():
    model = tiny_model(seed=7)
    _, state = model(random_ids(2, 5, seed=7), return_state=True)
    decoder = StaticDecoder(model, DecodeState.from_state(state, model.config))
    with pytest.raises(ValueError, match=r"one int64 token id per row, shape \(2,\)"):
        decoder.step(torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        decoder.step(torch.tensor([1, 64]))
    with pytest.raises(ValueError, match="different config"):
        DecodeState.from_state(state, tiny_model(model_dim=48).config)
    state.position = torch.tensor([5, -1])
    with pytest.raises(ValueError, match="position"):
        DecodeState.from_state(state, model.config)
    fresh = DecodeState.from_state(model(random_ids(1, 3, 0), return_state=True)[1], model.config)
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(model, fresh, cuda_graph=True)
    with pytest.raises(ValueError, match="eval mode"):
        StaticDecoder(model.train(), fresh)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", [False, pytest.param(True, marks=requires_triton)])
def test_compiled_decode_step_equals_eager(kernels):
    """torch.compile of the whole step on the CPU (Inductor, one graph), against the eager PyTorch step, across a
    chunk boundary; with kernels, the compiled step holds the TimestepNorm's and the CEMA's in-place Triton steps
    and the attention's kernels that write the key/value buffers (mutating custom ops, here under the
    interpreter), the fused queries and keys and the inference row-norms, as on a GPU."""
    from megalodon.ops import attention as attention_ops
    from megalodon.ops import cema as cema_ops
    from megalodon.ops import fused as fused_ops
    from megalodon.ops import static_kv as static_kv_ops
    from megalodon.ops import timestep_norm as norm_ops

    model = tiny_model(torch.float32, seed=8, num_layers=1)
    _, state = model(random_ids(2, 5, seed=8), return_state=True)
    eager = StaticDecoder(model, DecodeState.from_state(state, model.config))
    compiled = StaticDecoder(model, DecodeState.from_state(state, model.config), compile=True)
    for t in range(CHUNK):
        ids = random_ids(1, 2, seed=100 + t)[0]
        with pytest.MonkeyPatch.context() as patch:  # the kernels for the compiled step only
            if kernels:
                patch.setattr(norm_ops, "use_triton", lambda op, *tensors: op == "timestep_norm_step")
                patch.setattr(cema_ops, "use_triton", lambda op, *tensors: op == "cema_step")
                patch.setattr(attention_ops, "use_triton", lambda op, *tensors: op == "queries_keys")
                patch.setattr(static_kv_ops, "use_triton", lambda op, *tensors: op == "static_kv")
                patch.setattr(fused_ops, "use_triton", lambda op, *tensors: op == "norm_rows")
                force_fused_rms_norm(patch)
            logits = compiled.step(ids)
        torch.testing.assert_close(logits, eager.step(ids), rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(compiled.state.tensors(), eager.state.tensors(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_token_reader_on_cpu():
    reader = TokenReader()
    reader.start(torch.tensor([3, 4]))
    assert reader.get() == [3, 4]


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------------------------
def cuda_decoders(dtype=torch.float32, compile=False):
    model = tiny_model(dtype, seed=9).cuda()
    prompts = [random_ids(1, n, seed=n)[0].cuda() for n in (3, 8, 13)]
    state = stacked_prefill(model, prompts)
    graphed = StaticDecoder(model, DecodeState.from_state(state, model.config), compile=compile)
    eager = StaticDecoder(model, DecodeState.from_state(state, model.config), cuda_graph=False)
    return model, graphed, eager


@requires_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_replay_equals_eager(compile):
    _, graphed, eager = cuda_decoders(compile=compile)
    assert graphed.cuda_graph and not eager.cuda_graph
    for t in range(2 * CHUNK + 1):
        ids = random_ids(1, 3, seed=200 + t)[0].cuda()
        torch.testing.assert_close(graphed.step(ids), eager.step(ids), rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(graphed.state.tensors(), eager.state.tensors()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


@requires_cuda
def test_cuda_decode_steps_do_not_sync():
    model, graphed, eager = cuda_decoders()
    ids = torch.tensor([1, 2, 3], device="cuda")
    graphed.step(ids), eager.step(ids)  # warm-up: capture, lazy initializations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(CHUNK + 1):
            logits = graphed.step(ids)
            ids = logits.argmax(-1)
            model.decode_step_(ids, eager.state)
    finally:
        torch.cuda.set_sync_debug_mode(0)
