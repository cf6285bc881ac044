"""The forward pass: core logits unchanged, labels loss, cache continuation, padding."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from helpers import CUDA_MARKS  # noqa: E402

from megalodon.hf import MegalodonCache  # noqa: E402
from megalodon.hf.modeling import CACHE_ARG  # noqa: E402
from megalodon.inference.decoding import WARMUP_STEPS  # noqa: E402


def _cache(output):
    """The cache field under the installed transformers' name ("cache", or "past_key_values" in early 5.x)."""
    return output.get(CACHE_ARG)


def _ids(batch, length, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_are_the_core_logits(core, hf_model):
    ids = _ids(2, 13)
    out = hf_model(ids)
    assert torch.equal(out.logits, core(ids))
    assert isinstance(_cache(out), MegalodonCache) and _cache(out).get_seq_length() == 13


def test_labels_give_the_shifted_cross_entropy(core, hf_model):
    ids = _ids(2, 13)
    labels = ids.clone()
    labels[0, :5] = -100
    logits = core(ids)
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                             ignore_index=-100)
    loss = hf_model(ids, labels=labels).loss
    torch.testing.assert_close(loss, manual, rtol=0, atol=0)
    hf_model.train()
    assert _cache(hf_model(ids, labels=labels)) is None  # training does not build a cache unless asked
    hf_model(ids, labels=labels).loss.backward()
    assert core.embed.weight.grad is not None


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch_gives_the_summed_loss_over_the_steps_tokens(core, hf_model, as_tensor):
    """transformers' Trainer passes num_items_in_batch (the labelled tokens of the whole optimizer step) under
    gradient accumulation and then leaves the loss undivided: each micro-batch's loss must be its summed
    cross-entropy over that count (a mean here would scale the step's gradient by the accumulation steps)."""
    ids = _ids(2, 13)
    labels = ids.clone()
    labels[1, 3:9] = -100
    logits = core(ids).double()
    summed = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                             ignore_index=-100, reduction="sum")
    items = torch.tensor(57) if as_tensor else 57
    loss = hf_model(ids, labels=labels, num_items_in_batch=items).loss
    torch.testing.assert_close(loss, (summed / 57).float(), rtol=1e-6, atol=0)


def test_continuing_the_cache_equals_one_call(core, hf_model):
    ids = _ids(2, 21)
    whole = core(ids)
    first = hf_model(ids[:, :11], use_cache=True)
    second = hf_model(ids[:, 11:], cache=_cache(first))
    assert _cache(second) is _cache(first) and _cache(second).get_seq_length() == 21
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole, rtol=1e-5, atol=1e-5)


def test_padded_rows_run_on_their_real_tokens_only(core, hf_model):
    ids = _ids(3, 12)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    out = hf_model(ids, attention_mask=mask)
    for row, (start, end) in enumerate([(5, 12), (0, 12), (0, 9)]):
        alone = core(ids[row:row + 1, start:end])
        torch.testing.assert_close(out.logits[row:row + 1, start:end], alone, rtol=1e-5, atol=1e-5)
    assert bool((out.logits[mask == 0] == 0).all())
    assert _cache(out).state.position.tolist() == [7, 12, 9]


@pytest.mark.parametrize("padded", [False, True])
def test_logits_to_keep_returns_the_last_columns(hf_model, padded):
    ids = _ids(3, 12)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5] = 0
        mask[2, 9:] = 0
    full = hf_model(ids, attention_mask=mask).logits
    for keep in (1, 4, 20):
        kept = hf_model(ids, attention_mask=mask, logits_to_keep=keep).logits
        torch.testing.assert_close(kept, full[:, -keep:], rtol=1e-5, atol=1e-5)


def test_unsupported_inputs_are_refused(hf_model):
    ids = _ids(2, 6)
    holey = torch.tensor([[1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="padding between real tokens"):
        hf_model(ids, attention_mask=holey)
    with pytest.raises(ValueError, match="no real token"):
        hf_model(ids, attention_mask=torch.zeros_like(ids))
    cache = _cache(hf_model(ids))
    with pytest.raises(ValueError, match="must not be padded"):
        hf_model(ids[:, :2], attention_mask=torch.tensor([[1] * 7 + [0], [1] * 8]), cache=cache)
    with pytest.raises(ValueError, match="inputs_embeds"):
        hf_model(ids, inputs_embeds=torch.zeros(2, 6, 64))
    with pytest.raises(ValueError, match="needs input_ids"):
        hf_model(attention_mask=torch.ones(2, 6))
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="logits_to_keep must be an integer >= 0"):
            hf_model(ids, logits_to_keep=bad)
    with pytest.raises(ValueError, match="labels need the logits of every position"):
        hf_model(ids, labels=ids, logits_to_keep=1)
    with pytest.raises(TypeError, match="cache must be a MegalodonCache .*got tuple"):
        hf_model(ids, past_key_values=((torch.zeros(1),),))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 7\) but input_ids has \(2, 6\)"):
        hf_model(ids, attention_mask=torch.tensor([[0] + [1] * 6] * 2))
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 6\)"):
        hf_model(ids, labels=ids[:, :5])
    with pytest.raises(ValueError, match="already seen all 6 input tokens"):
        hf_model.prepare_inputs_for_generation(ids, cache=cache)


def test_tuple_output_when_return_dict_is_false(core, hf_model):
    ids = _ids(1, 5)
    loss, logits, cache = hf_model(ids, labels=ids, return_dict=False)
    assert torch.equal(logits, core(ids)) and isinstance(cache, MegalodonCache) and loss.dim() == 0


def test_reorder_cache_selects_rows(core, hf_model):
    ids = _ids(3, 10)
    cache = _cache(hf_model(ids))
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    nxt = _ids(3, 1, seed=1)[[2, 2, 0]]
    step = hf_model(nxt, cache=cache).logits
    _, state = core(ids[[2, 2, 0]], return_state=True)
    torch.testing.assert_close(step, core(nxt, state=state), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
def test_one_token_steps_take_the_static_decode_path_with_forwards_logits(core, hf_model, monkeypatch, device):
    """generate's steps (one token, no gradient, eval mode) run on the core's static decode buffers (on CUDA,
    replayed from a CUDA graph). Against forward() (which the same call takes with gradients on): rows at
    different in-chunk positions, across chunk boundaries, through a beam search's reorder, and after the state
    is read back mid-way."""
    core.to(device)
    static_steps = []

    def counted(input_ids, state, constants=None):
        static_steps.append(input_ids.shape[0])
        return type(core).decode_step_(core, input_ids, state, constants)

    monkeypatch.setattr(core, "decode_step_", counted)
    replays = []
    if device == "cuda":
        replay = torch.cuda.CUDAGraph.replay
        monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
    ids = _ids(3, 12).to(device)
    mask = torch.ones_like(ids)
    mask[0, :5] = mask[2, :9] = 0  # fills 7, 4 and 3 in chunks of 8
    static, through_forward = (_cache(hf_model(ids, attention_mask=mask)) for _ in range(2))
    for step in range(12):
        token = _ids(3, 1, seed=step).to(device)
        with torch.no_grad():
            fast = hf_model(token, cache=static).logits
        slow = hf_model(token, cache=through_forward).logits  # gradients on: forward()
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        if step == 4:
            for cache in (static, through_forward):
                cache.reorder_cache(torch.tensor([2, 2, 0], device=device))
        if step == 8:
            assert static.state.position.tolist() == through_forward.state.position.tolist()
    if device == "cuda":  # each graph runs the step in Python for its warm-up and capture only; reading .state at
        # step 8 ends the first graph
        assert static_steps == [3] * 2 * (WARMUP_STEPS + 1) and len(replays) == 12
    else:
        assert static_steps == [3] * 12
    assert static.get_seq_length() == through_forward.get_seq_length() == 24
    for mine, theirs in zip(static.state.tensors().values(), through_forward.state.tensors().values()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_recomputes_each_block_and_keeps_the_gradients(core, hf_model):
    import warnings

    ids = _ids(2, 21)
    calls = []
    hf_model.model.layers[0].mega.register_forward_hook(lambda *args: calls.append(1))
    hf_model.train()

    def loss_and_grads():
        hf_model.zero_grad()
        calls.clear()
        loss = hf_model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in hf_model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads()
    assert len(calls) == 1
    with warnings.catch_warnings():  # transformers 5.x renames it activation_checkpointing_enable, with a warning
        warnings.simplefilter("ignore", FutureWarning)
        hf_model.gradient_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in hf_model.modules())
    loss, grads = loss_and_grads()
    assert len(calls) == 2  # the forward, and its recomputation in backward
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    hf_model.eval()  # evaluation runs the blocks plainly, checkpointing on or not
    with torch.no_grad():
        calls.clear()
        torch.testing.assert_close(hf_model(ids, labels=ids).loss, plain_loss, rtol=0, atol=0)
    assert len(calls) == 1
    hf_model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hf_model.gradient_checkpointing_disable()
    assert not any(getattr(m, "gradient_checkpointing", False) for m in hf_model.modules())
    loss_and_grads()
    assert len(calls) == 1


@pytest.mark.parametrize("share_emb", [False, True])
def test_resized_token_embeddings_take_new_ids_and_keep_the_old_logits(make_core, share_emb, tmp_path):
    """resize_token_embeddings (new special tokens for fine-tuning): the new ids run, the old vocabulary's
    logits stay as they were, and the resized model saves and loads back."""
    from transformers import AutoModelForCausalLM

    from megalodon.hf import wrap

    model = wrap(make_core(share_emb=share_emb))
    ids = _ids(2, 13)
    before, shared = model(ids).logits, model.model.config
    model.resize_token_embeddings(300, mean_resizing=False)
    assert model.model.config.vocab_size == model.config.vocab_size == 300
    assert shared.vocab_size == 259  # the core's config is replaced, not edited: another model may hold it
    assert model.get_output_embeddings().weight.shape == (300, model.config.model_dim)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == share_emb
    torch.testing.assert_close(model(ids).logits[..., :259], before, rtol=0, atol=0)
    grown = ids.clone()
    grown[:, 5] = 299  # a new token's id, which the core refused before it knew the new size
    logits = model(grown).logits
    assert logits.shape == (2, 13, 300)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(grown).logits, logits, rtol=0, atol=0)
