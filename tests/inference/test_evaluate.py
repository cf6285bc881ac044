"""evaluate(): streaming equals one forward, buckets, the report files, the baseline, and input errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megalodon.inference import EvalDocument, documents_from_texts, evaluate, write_report
from megalodon.inference.evaluate import check_bucket_edges, default_bucket_edges


def random_document(length: int, seed: int = 0) -> EvalDocument:
    ids = torch.randint(0, 259, (length,), generator=torch.Generator().manual_seed(seed))
    return EvalDocument(ids, n_bytes=length + 3, name=f"random{seed}")


def full_forward_nll(model, doc: EvalDocument, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        logits = model(doc.ids[None, :-1], **kwargs)[0]
    return F.cross_entropy(logits.double(), doc.ids[1:], reduction="none")


def test_streaming_perplexity_equals_one_forward(model):
    docs = [random_document(61, 0), random_document(30, 1)]
    result = evaluate(model, docs, block_size=16)
    nll = torch.cat([full_forward_nll(model, d) for d in docs])
    assert result.n_tokens == 60 + 29 and result.n_bytes == 64 + 33
    assert math.isclose(result.nll, float(nll.sum()), rel_tol=1e-11)
    assert math.isclose(result.perplexity, math.exp(float(nll.mean())), rel_tol=1e-11)
    assert math.isclose(result.bits_per_byte, float(nll.sum()) / math.log(2) / 97, rel_tol=1e-11)


def test_losses_land_in_the_right_position_buckets(model):
    doc = random_document(30)
    result = evaluate(model, [doc], bucket_edges=[0, 4, 10, 1000])
    nll = full_forward_nll(model, doc)  # nll[i] is the loss of the token at position i + 1
    assert result.bucket_tokens == [3, 6, 20]
    for got, want in zip(result.bucket_loss, [nll[:3].sum(), nll[3:9].sum(), nll[9:].sum()]):
        assert math.isclose(got, float(want), rel_tol=1e-11)
    buckets = result.buckets()
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 4), (4, 10), (10, 1000)]


def test_default_bucket_edges_double_from_1024():
    assert default_bucket_edges(10) == [0, 1024]
    assert default_bucket_edges(1025) == [0, 1024, 2048]
    assert default_bucket_edges(5000) == [0, 1024, 2048, 4096, 8192]
    for bad in ([0], [1, 5], [0, 5, 5]):
        with pytest.raises(ValueError, match="bucket edges"):
            check_bucket_edges(bad)


def test_report_writes_json_and_png(model, llama, tokenizer, tmp_path):
    docs = documents_from_texts(["a short document about nothing much", "another one"], tokenizer)
    runs = [evaluate(model, docs, label="megalodon"), evaluate(llama, docs, window=8, label="llama")]
    json_path, png_path = write_report(runs, tmp_path / "out", {"corpus": "test"})
    report = json.loads(json_path.read_text())
    assert report["corpus"] == "test"
    assert [r["label"] for r in report["results"]] == ["megalodon", "llama"]
    assert report["results"][1]["settings"]["attention"] == "sliding window of 8"
    # text bytes + eos, less the unpredicted first token
    assert report["results"][0]["loss_by_position"][0]["tokens"] == 35 + 11
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_documents_from_texts_tokenize_a_long_text_in_parts_to_the_ids_of_the_whole(monkeypatch):
    """`megalodon eval --files` tokenizes a document at a time from a stream, a long one in parts (the tokenizer
    work on 100 MB of text would otherwise be gigabytes): the same ids, eos appended, bytes counted."""
    import importlib

    from megalodon.data import BPETokenizer, ByteTokenizer

    evaluate_module = importlib.import_module("megalodon.inference.evaluate")  # the package exports the function

    text = "".join(f"line {i}: the naïve king's {i * i} crowns.\n" for i in range(300))
    bpe = BPETokenizer.train([text], vocab_size=300)
    monkeypatch.setattr(evaluate_module, "_PART_CHARS", 100)
    for tokenizer in (ByteTokenizer(), bpe):
        calls = []
        monkeypatch.setattr(tokenizer, "encode", lambda t, _e=tokenizer.encode: calls.append(len(t)) or _e(t))
        docs = documents_from_texts(iter([text, "short"]), tokenizer, names=["long", "short"])
        monkeypatch.undo()
        monkeypatch.setattr(evaluate_module, "_PART_CHARS", 100)
        assert docs[0].ids.tolist() == tokenizer.encode(text) + [tokenizer.eos_id]
        assert docs[1].ids.tolist() == tokenizer.encode("short") + [tokenizer.eos_id]
        assert [d.name for d in docs] == ["long", "short"] and docs[0].n_bytes == len(text.encode())
        assert len(calls) > 50 and max(calls) < 200, (type(tokenizer).__name__, len(calls), max(calls))


def test_baseline_window_equals_one_windowed_forward(llama):
    doc = random_document(50)
    windowed = evaluate(llama, [doc], window=8, block_size=7)
    assert math.isclose(windowed.nll, float(full_forward_nll(llama, doc, window=8).sum()), rel_tol=1e-11)
    capped = evaluate(llama, [doc], max_context=8)  # full attention up to 8 tokens, then a window of 8
    assert math.isclose(capped.nll, windowed.nll, rel_tol=1e-11)
    roomy = evaluate(llama, [doc], max_context=64, block_size=16)  # the cap is never reached: full attention
    assert math.isclose(roomy.nll, float(full_forward_nll(llama, doc).sum()), rel_tol=1e-11)
    assert windowed.peak_state_bytes < roomy.peak_state_bytes


def test_truncate_chunks_changes_long_document_perplexity(model):
    doc = random_document(90)
    plain, truncated = evaluate(model, [doc]), evaluate(model, [doc], truncate_chunks=8)
    assert truncated.settings["truncate_chunks"] == 8 and plain.settings["truncate_chunks"] is None
    assert plain.perplexity != truncated.perplexity


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=8), "window applies to the baseline"),
    (dict(block_size=12), "multiple of chunk_size"),
    (dict(truncate_chunks=1), "truncate_chunks"),
    (dict(block_size=0), "block_size"),
])
def test_bad_settings_are_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate(model, [random_document(20)], **kwargs)


def test_baseline_refuses_truncate_chunks_and_empty_input(llama, model):
    with pytest.raises(ValueError, match="Megalodon only"):
        evaluate(llama, [random_document(20)], truncate_chunks=8)
    with pytest.raises(ValueError, match="nothing to predict"):
        evaluate(model, [random_document(1)])


def test_position_buckets_split_a_block_as_bucketize_files_each_position():
    """The host-side split of a block's positions into buckets (no index tensor to send to a GPU) against
    torch.bucketize position by position, for blocks that start on, before and past edges, and past the last."""
    from megalodon.inference.evaluate import position_buckets

    generator = torch.Generator().manual_seed(0)
    for edges in ([0, 4, 10, 1000], [0, 1024, 2048, 4096], [0, 1]):
        inner = torch.tensor(edges[1:-1], dtype=torch.int64)
        for _ in range(200):
            start = int(torch.randint(1, 2 * edges[-1] + 2, (), generator=generator))
            count = int(torch.randint(1, 3000, (), generator=generator))
            want = torch.bucketize(torch.arange(start, start + count), inner, right=True)
            first, spans = position_buckets(edges, start, count)
            got = torch.cat([torch.full((b - a,), k) for k, (a, b) in enumerate(spans, first)])
            assert torch.equal(got, want) and all(b > a for a, b in spans), (edges, start, count, spans)


def test_evaluation_reads_the_device_once_a_document_however_many_blocks(model, monkeypatch):
    """Each block's losses add up where they were computed; the host reads a document's sum once and the buckets
    once at the end. A read a block would drain a GPU's queue between blocks (the model's own value checks in
    their device form here, as on a GPU)."""
    from host_syncs import counted_host_syncs, device_value_checks

    device_value_checks(monkeypatch)
    for length in (40, 160):  # 3 and 10 blocks of 16
        with counted_host_syncs() as found:
            evaluate(model, [random_document(length, seed=length)], block_size=16)
        assert len(found) == 2, (length, found)
