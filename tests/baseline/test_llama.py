"""The Llama baseline against an explicit float64 reference: masks, documents, KV cache, windows, presets, and the
static decode (StaticKVCache, Llama.decode_step_, CUDA graphs)."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import requires_cuda
from megalodon import count_parameters
from megalodon.baseline import (LLAMA_PRESETS, KVCache, Llama, LlamaConfig, StaticKVCache, count_llama_parameters,
                                matched_llama_config)
from megalodon.inference.decoding import StaticDecoder

VOCAB = 64


def tiny_llama(seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    values = dict(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=4, ffn_hidden_dim=48)
    model = Llama(LlamaConfig(**{**values, **overrides})).double().eval()
    with torch.no_grad():  # move the norm weights off 1 so that they are exercised
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.add_(0.1 * torch.randn_like(param))
    return model


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- the reference: one dense softmax per layer, written from the equations ----------------------------------
def reference_logits(model: Llama, ids: torch.Tensor, doc_start=None, window=None) -> torch.Tensor:
    cfg = model.config
    batch, length = ids.shape
    hd = cfg.head_dim
    doc_start = torch.zeros(batch, length, dtype=torch.bool) if doc_start is None else doc_start
    doc_id = doc_start.long().cumsum(1)  # B x L
    index = torch.arange(length)
    first = torch.stack([torch.tensor([int(index[doc_id[b] == doc_id[b, i]].min()) for i in range(length)])
                         for b in range(batch)])
    pos = (index - first).double()  # position inside the document
    mask = (index[:, None] >= index[None, :]) & (doc_id[:, :, None] == doc_id[:, None, :])  # B x L x L
    if window is not None:
        mask &= index[:, None] - index[None, :] < window

    def rms(x, weight):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight

    def rotate(t):  # B x L x H x hd; pair feature j with j + hd/2 as one complex number
        freqs = cfg.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        z = torch.complex(t[..., :hd // 2], t[..., hd // 2:])
        z = z * torch.exp(1j * pos[:, :, None, None] * freqs)
        return torch.cat([z.real, z.imag], dim=-1)

    x = model.embed_tokens.weight[ids]
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        h = rms(x, block.input_layernorm.weight)
        q, k, v = (
            (h @ proj.weight.T).view(batch, length, cfg.num_heads, hd)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        q, k = rotate(q), rotate(k)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, length, -1)
        x = x + out @ attn.o_proj.weight.T
        h = rms(x, block.post_attention_layernorm.weight)
        x = x + (F.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return rms(x, model.norm.weight) @ model.lm_head.weight.T


def run_in_pieces(model, ids, cuts, doc_start=None, window=None):
    """Logits of ids fed through the KV cache in pieces split at cuts, and the caches after each piece."""
    bounds = [0, *cuts, ids.shape[1]]
    logits, caches, past = [], [], None
    for a, b in zip(bounds[:-1], bounds[1:]):
        piece_doc = None if doc_start is None else doc_start[:, a:b]
        out, past = model(ids[:, a:b], doc_start=piece_doc, past=past, return_past=True, window=window)
        logits.append(out)
        caches.append(past)
    return torch.cat(logits, dim=1), caches


def random_cuts(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    count = int(torch.randint(1, 6, (1,), generator=gen))
    return sorted(set(torch.randint(1, length, (count,), generator=gen).tolist()))


# ---- attention paths ---------------------------------------------------------------------------------------
def test_causal_sdpa_matches_dense_reference():
    model, ids = tiny_llama(), random_ids(2, 20)
    logits = model(ids)
    assert logits.shape == (2, 20, VOCAB)
    torch.testing.assert_close(logits, reference_logits(model, ids), rtol=0, atol=1e-10)


def test_tied_embeddings_share_one_tensor_and_match_reference():
    model, ids = tiny_llama(tie_embeddings=True), random_ids(2, 12)
    assert model.lm_head.weight is model.embed_tokens.weight
    torch.testing.assert_close(model(ids), reference_logits(model, ids), rtol=0, atol=1e-10)


def test_logits_are_fp32_under_bf16_autocast_and_gradients_flow():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=VOCAB, num_layers=1, model_dim=32, num_heads=2, ffn_hidden_dim=32))
    ids = random_ids(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert logits.dtype == torch.float32
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---- documents -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [1, 4, 7, 13])
def test_document_packed_after_another_gives_its_logits_alone(offset):
    model = tiny_llama()
    doc = random_ids(1, 9, seed=2)
    packed = torch.cat([random_ids(1, offset, seed=3), doc, random_ids(1, 3, seed=4)], dim=1)
    doc_start = torch.zeros_like(packed, dtype=torch.bool)
    doc_start[0, [offset, offset + 9]] = True
    logits = model(packed, doc_start=doc_start)
    torch.testing.assert_close(logits[:, offset:offset + 9], model(doc), rtol=0, atol=1e-10)


def test_documents_match_reference_with_different_boundaries_per_row():
    model, ids = tiny_llama(), random_ids(3, 24)
    doc_start = torch.rand(3, 24, generator=torch.Generator().manual_seed(5)) < 0.2
    torch.testing.assert_close(model(ids, doc_start=doc_start), reference_logits(model, ids, doc_start),
                               rtol=0, atol=1e-10)


# ---- KV cache and sliding window -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_split_invariance_with_kv_cache(seed):
    model, ids = tiny_llama(), random_ids(3, 24, seed=seed)
    pieces, _ = run_in_pieces(model, ids, random_cuts(24, seed))
    torch.testing.assert_close(pieces, model(ids), rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window", [1, 5])
def test_split_invariance_with_sliding_window(seed, window):
    model, ids = tiny_llama(), random_ids(3, 24, seed=seed)
    reference = reference_logits(model, ids, window=window)
    torch.testing.assert_close(model(ids, window=window), reference, rtol=0, atol=1e-10)
    pieces, _ = run_in_pieces(model, ids, random_cuts(24, seed), window=window)
    torch.testing.assert_close(pieces, reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("window", [None, 6])
def test_split_invariance_with_documents_crossing_pieces(window):
    model, ids = tiny_llama(), random_ids(2, 30, seed=7)
    doc_start = torch.rand(2, 30, generator=torch.Generator().manual_seed(8)) < 0.15
    pieces, _ = run_in_pieces(model, ids, [5, 11, 12, 23], doc_start, window)
    torch.testing.assert_close(pieces, reference_logits(model, ids, doc_start, window), rtol=0, atol=1e-10)


def test_cache_grows_with_position_without_window_and_is_bounded_with_one():
    model, ids = tiny_llama(), random_ids(2, 40)
    cuts = list(range(4, 40, 4))
    _, caches = run_in_pieces(model, ids, cuts)
    sizes = [c.nbytes for c in caches]
    assert [c.position for c in caches] == [*cuts, 40]
    assert all(b > a for a, b in zip(sizes, sizes[1:]))
    assert sizes[-1] - sizes[0] == 9 * (sizes[1] - sizes[0])  # linear in position

    window = 7
    _, caches = run_in_pieces(model, ids, cuts, window=window)
    assert [c.num_cached for c in caches] == [min(c.position, window - 1) for c in caches]
    assert max(c.nbytes for c in caches) == caches[-1].nbytes < sizes[-1] / 5


# ---- presets ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab_size", [None, 259, 8192])
@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_matched_presets_within_five_percent_of_megalodon(preset, vocab_size):
    cfg = matched_llama_config(preset, vocab_size)
    overrides = {} if vocab_size is None else {"vocab_size": vocab_size}
    assert abs(count_llama_parameters(cfg) / count_parameters(preset, **overrides) - 1) < 0.05
    if vocab_size is None:
        assert LlamaConfig(**LLAMA_PRESETS[preset]) == cfg


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
@pytest.mark.parametrize("tie", [False, True])
def test_analytic_count_equals_instantiated(preset, tie):
    cfg = LlamaConfig(**{**LLAMA_PRESETS[preset], "tie_embeddings": tie})
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = Llama(cfg)
    assert model.num_parameters() == count_llama_parameters(cfg)


def test_matched_config_rejects_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        matched_llama_config("tinny", 256)


# ---- errors at the boundary ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, error, match", [
    (torch.zeros(1, 4), TypeError, "integer token ids"),
    (torch.zeros(1, 4, dtype=torch.bool), TypeError, "integer token ids"),
    ([[1, 2, 3]], TypeError, "torch.Tensor"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty"),
    (torch.tensor([[1, VOCAB]]), ValueError, f"token id {VOCAB} is out of range for vocab_size={VOCAB}"),
    (torch.tensor([[-1, 2]]), ValueError, "token id -1 is out of range"),
    (torch.tensor([1, 2, 3]), ValueError, r"shape \(batch, length\)"),
])
def test_bad_input_ids_raise(bad, error, match):
    with pytest.raises(error, match=match):
        tiny_llama()(bad)


def test_bad_call_arguments_raise():
    model, ids = tiny_llama(), random_ids(2, 6)
    with pytest.raises(ValueError, match="doc_start must be a bool tensor of shape"):
        model(ids, doc_start=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="doc_start must be a bool tensor"):
        model(ids, doc_start=torch.zeros(2, 6, dtype=torch.long))
    for window in (0, 2.5, True):
        with pytest.raises(ValueError, match="window must be None or an integer"):
            model(ids, window=window)
    _, past = model(ids, return_past=True, window=4)
    with pytest.raises(ValueError, match="batch size 2"):
        model(ids[:1], past=past, window=4)
    with pytest.raises(ValueError, match="window=4, got window=None"):
        model(ids, past=past)
    with pytest.raises(TypeError, match="past must be a KVCache"):
        model(ids, past=(past.keys, past.values))
    assert isinstance(past, KVCache)


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("num_layers", -1), ("model_dim", 2.0), ("num_heads", True), ("ffn_hidden_dim", 0),
    ("rope_base", 0.0), ("norm_eps", 0.0), ("dropout", 1.0), ("tie_embeddings", 1),
])
def test_config_errors_name_the_field(field, value):
    values = dict(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=4, ffn_hidden_dim=48)
    with pytest.raises(ValueError, match=f"LlamaConfig.{field}"):
        LlamaConfig(**{**values, field: value})


def test_config_rejects_heads_that_do_not_divide_or_odd_head_dim():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        LlamaConfig(vocab_size=VOCAB, model_dim=32, num_heads=5)
    with pytest.raises(ValueError, match="must be even"):
        LlamaConfig(vocab_size=VOCAB, model_dim=30, num_heads=2)


# ---- static decode -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt_length", [1, 6, 13])
def test_static_decode_equals_the_reference_at_every_position(prompt_length):
    model, ids = tiny_llama(), random_ids(3, 24, seed=prompt_length)
    doc_start = torch.zeros_like(ids, dtype=torch.bool)
    doc_start[1, prompt_length // 2] = doc_start[2, prompt_length - 1] = True  # documents begun in the prompt
    reference = reference_logits(model, ids, doc_start)
    _, past = model(ids[:, :prompt_length], doc_start=doc_start[:, :prompt_length], return_past=True)
    cache = model.static_cache(3, 24, past)
    for t in range(prompt_length, 24):
        logits = model.decode_step_(ids[:, t], cache)
        torch.testing.assert_close(logits, reference[:, t], rtol=0, atol=1e-10)
    assert cache.position.tolist() == [24, 24, 24]


def test_static_decode_from_an_empty_cache_equals_forward():
    model, ids = tiny_llama(seed=1), random_ids(2, 10, seed=1)
    decoder = StaticDecoder(model, model.static_cache(2, 10))
    logits = torch.stack([decoder.step(ids[:, t]) for t in range(10)], dim=1)
    torch.testing.assert_close(logits, model(ids), rtol=0, atol=1e-10)


def test_full_cache_and_bad_conversions_are_refused():
    model, ids = tiny_llama(), random_ids(1, 6)
    decoder = StaticDecoder(model, model.static_cache(1, 2))
    decoder.step(ids[:, 0]), decoder.step(ids[:, 1])
    with pytest.raises(ValueError, match="holds 2 positions and is full"):
        decoder.step(ids[:, 2])
    _, windowed = model(ids, return_past=True, window=3)
    with pytest.raises(ValueError, match="sliding-window"):
        StaticKVCache.from_cache(windowed, 10)
    _, past = model(ids, return_past=True)
    with pytest.raises(ValueError, match="no room"):
        StaticKVCache.from_cache(past, 6)
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        model.static_cache(1, 0)


@requires_cuda
def test_cuda_graph_decode_equals_eager_without_syncs():
    model = tiny_llama().float().cuda()
    ids = random_ids(2, 12, seed=3).cuda()
    _, past = model(ids[:, :4], return_past=True)
    graphed = StaticDecoder(model, model.static_cache(2, 16, past))
    eager = StaticDecoder(model, model.static_cache(2, 16, past), cuda_graph=False)
    torch.testing.assert_close(graphed.step(ids[:, 4]), eager.step(ids[:, 4]), rtol=1e-5, atol=1e-5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside a step raises
    try:
        pairs = [(graphed.step(ids[:, t]).clone(), eager.step(ids[:, t])) for t in range(5, 12)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for mine, theirs in pairs:
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
