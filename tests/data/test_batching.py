import json
import math

import pytest
import torch
from helpers import requires_cuda

from megalodon.data import IGNORE_INDEX, ByteTokenizer, PackedBatcher, eval_windows

TOK = ByteTokenizer()
PAD, EOS = TOK.pad_id, TOK.eos_id
B, L, C = 3, 16, 4


def _rows(batches: list) -> list[dict[str, torch.Tensor]]:
    """Each row's windows joined back into one stream."""
    return [{k: torch.cat([getattr(x, k)[b] for x in batches]) for k in ("input_ids", "labels", "doc_start")}
            for b in range(batches[0].input_ids.shape[0])]


def _segments(row) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) of each complete document span in a row stream (the cut-off last one is dropped)."""
    starts = torch.nonzero(row["doc_start"]).flatten().tolist()
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:])]


def _store_docs(store) -> list[list[int]]:
    return [store.document(i).tolist() for i in range(store.n_docs)]


def test_seq_len_must_be_a_multiple_of_chunk_size(make_store, synthetic_documents):
    store = make_store(synthetic_documents(10))
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        PackedBatcher(store, batch_size=2, seq_len=10, chunk_size=4, seed=0, pad_id=PAD)


def test_documents_start_on_chunk_boundaries_and_labels_stay_inside_them(make_store, synthetic_documents):
    store = make_store(synthetic_documents(30))
    batcher = PackedBatcher(store, B, L, C, seed=0, pad_id=PAD)
    batches = [batcher.next_batch() for _ in range(40)]
    assert batches[0].input_ids.shape == (B, L) and batches[0].input_ids.dtype == torch.int64
    for x in batches:
        assert not x.doc_start[:, torch.arange(L) % C != 0].any()
    docs = _store_docs(store)
    for row in _rows(batches):
        for inputs, labels in _segments(row):
            n = inputs.tolist().index(EOS) + 1  # documents end with their only eos
            assert inputs[:n].tolist() in docs
            assert labels[: n - 1].tolist() == inputs[1:n].tolist()  # next token of the same document
            assert (labels[n - 1:] == IGNORE_INDEX).all()  # eos predicts nothing; padding is masked
            assert (inputs[n:] == PAD).all() and len(inputs) - n < C and len(inputs) % C == 0


def test_every_document_once_per_epoch(make_store, synthetic_documents):
    store = make_store(synthetic_documents(25))
    batcher = PackedBatcher(store, B, L, C, seed=1, pad_id=PAD)
    # Row b reads items b, b+B, ... of the endless order, so its first ceil((N-b)/B) documents are epoch 0.
    per_row = [math.ceil((store.n_docs - b) / B) for b in range(B)]
    batches = [batcher.next_batch()]
    while any(len(_segments(r)) <= n for r, n in zip(_rows(batches), per_row)):
        batches.append(batcher.next_batch())
    seen = [inputs[: inputs.tolist().index(EOS) + 1].tolist()
            for row, n in zip(_rows(batches), per_row) for inputs, _ in _segments(row)[:n]]
    assert sorted(seen) == sorted(_store_docs(store))


def test_continues_flag_matches_the_previous_window(make_store, synthetic_documents):
    batcher = PackedBatcher(make_store(synthetic_documents(30)), B, L, C, seed=0, pad_id=PAD)
    prev = batcher.next_batch()
    assert not prev.continues.any()
    for _ in range(30):
        x = batcher.next_batch()
        assert torch.equal(x.continues, ~x.doc_start[:, 0])
        # A continued document's previous window ended on a real token whose label is our first input.
        carried = prev.labels[:, -1] != IGNORE_INDEX
        assert torch.equal(carried, x.continues)
        assert torch.equal(prev.labels[carried, -1], x.input_ids[carried, 0])
        prev = x


def test_resume_gives_identical_batches(make_store, synthetic_documents):
    store = make_store(synthetic_documents(8))  # few documents: several epochs pass
    batcher = PackedBatcher(store, B, L, C, seed=5, pad_id=PAD)
    for _ in range(7):
        batcher.next_batch()
    state = json.loads(json.dumps(batcher.state_dict()))  # plain ints: fits any checkpoint format
    expected = [batcher.next_batch() for _ in range(25)]
    restored = PackedBatcher(store, B, L, C, seed=5, pad_id=PAD)
    restored.load_state_dict(state)
    for want in expected:
        got = restored.next_batch()
        for field in ("input_ids", "labels", "doc_start", "continues"):
            assert torch.equal(getattr(got, field), getattr(want, field))
    assert restored.padding_fraction == batcher.padding_fraction and batcher.epoch > 2
    with pytest.raises(ValueError, match="saved with"):
        PackedBatcher(store, B, L, C, seed=6, pad_id=PAD).load_state_dict(state)


def test_padding_fraction_counts_masked_padding(make_store, synthetic_documents):
    batcher = PackedBatcher(make_store(synthetic_documents(20)), B, L, C, seed=0, pad_id=PAD)
    batches = [batcher.next_batch() for _ in range(10)]
    pad = torch.stack([x.input_ids == PAD for x in batches])
    labels = torch.stack([x.labels for x in batches])
    assert (labels[pad] == IGNORE_INDEX).all()
    assert batcher.padding_fraction == pytest.approx(pad.float().mean().item())
    assert 0 < batcher.padding_fraction < 0.5


def test_fewer_documents_than_rows(make_store):
    batcher = PackedBatcher(make_store(["aaaa", "bbbbbb", "cc", "ddd"], split="train"), 8, 8, 4, seed=0, pad_id=PAD)
    x = batcher.next_batch()
    assert x.doc_start[:, 0].all()  # every row got a document


@pytest.mark.parametrize("batch_size", [1, 2])
def test_eval_windows_walk_each_document_once_in_order(make_store, synthetic_documents, batch_size):
    store = make_store(synthetic_documents(40), split="train")
    batches = list(eval_windows(store, seq_len=L, chunk_size=C, pad_id=PAD, batch_size=batch_size))
    docs = _store_docs(store)
    for b, row in enumerate(_rows(batches)):
        inputs = row["input_ids"][row["input_ids"] != PAD].tolist()
        assert inputs == sum(docs[b::batch_size], [])
    assert int(store.doc_bytes.sum()) == store.n_bytes
    last = batches[-1].input_ids
    assert last.shape == (batch_size, L) and (last != PAD).any()  # no trailing all-padding window


@requires_cuda
def test_a_batch_reaches_the_gpu_through_pinned_memory_unchanged(make_store, synthetic_documents):
    """Batch.to("cuda") copies from pinned memory without holding the host; the values arrive as they left."""
    batch = PackedBatcher(make_store(synthetic_documents(8)), B, L, C, seed=0, pad_id=PAD).next_batch()
    moved = batch.to("cuda")
    torch.cuda.synchronize()
    for name in ("input_ids", "labels", "doc_start", "continues"):
        assert getattr(moved, name).is_cuda and torch.equal(getattr(moved, name).cpu(), getattr(batch, name))
    assert torch.equal(moved.to("cpu").input_ids, batch.input_ids)  # back again: no pinning on the way to a CPU
