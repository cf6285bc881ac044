import json

import numpy as np
import pytest

from megalodon.data import SPLITS, BPETokenizer, ByteTokenizer, TokenStore, build_token_store

TOK = ByteTokenizer()


def _split_texts(directory) -> dict[str, list[str]]:
    stores = {s: TokenStore(directory, s) for s in SPLITS}
    return {s: [TOK.decode(st.document(i)) for i in range(st.n_docs)] for s, st in stores.items()}


def test_every_document_round_trips_into_exactly_one_split(tmp_path, synthetic_documents):
    docs = synthetic_documents(40)
    out = build_token_store(docs, TOK, tmp_path / "store")
    texts = _split_texts(out)
    assert sorted(t for split in texts.values() for t in split) == sorted(docs)
    assert [len(texts[s]) for s in SPLITS] == [36, 2, 2]
    store = TokenStore(out, "val")
    assert all(store.document(i)[-1] == TOK.eos_id for i in range(store.n_docs))
    assert store.tokens.dtype == np.uint16 and store.vocab_size == 259
    assert [int(b) for b in store.doc_bytes] == [len(t.encode()) for t in texts["val"]]
    assert store.n_bytes == sum(len(t.encode()) for t in texts["val"])


def test_split_is_deterministic_per_seed(tmp_path, synthetic_documents):
    docs = synthetic_documents(30)
    a = build_token_store(docs, TOK, tmp_path / "a", seed=3)
    b = build_token_store(docs, TOK, tmp_path / "b", seed=3)
    c = build_token_store(docs, TOK, tmp_path / "c", seed=4)
    for split in SPLITS:
        assert (a / f"{split}.bin").read_bytes() == (b / f"{split}.bin").read_bytes()
    assert _split_texts(a)["val"] != _split_texts(c)["val"]


def test_three_documents_give_one_per_split(tmp_path):
    out = build_token_store(["one", "two", "three"], TOK, tmp_path / "s")
    assert sorted(len(v) for v in _split_texts(out).values()) == [1, 1, 1]


def test_a_single_document_is_cut_into_pieces_that_keep_the_split_fractions(tmp_path):
    """One book (or two) cannot be split by document: it is cut at line breaks into 20 pieces, 18/1/1 for the
    default fractions (a third each, before: two thirds of the text held out)."""
    book = "".join(f"line {i}\n" for i in range(400))
    out = build_token_store([book], TOK, tmp_path / "s")
    texts = _split_texts(out)
    assert [len(texts[s]) for s in SPLITS] == [18, 1, 1]
    pieces = sorted((p for split in texts.values() for p in split), key=book.index)
    assert "".join(pieces) == book and all(p.endswith("\n") for p in pieces)
    two = build_token_store([book, book.upper()], TOK, tmp_path / "two", split_fractions=(0.8, 0.1, 0.1))
    assert [TokenStore(two, s).n_docs for s in SPLITS] == [16, 2, 2]


def test_truncated_bin_is_refused(tmp_path, synthetic_documents):
    out = build_token_store(synthetic_documents(10), TOK, tmp_path / "s")
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match=r"corrupt token store: .*train\.bin"):
        TokenStore(out, "train")


def test_every_corrupt_side_file_is_refused_by_name(tmp_path, synthetic_documents):
    """The index files beside the tokens: unreadable, the wrong length, offsets that do not tile the tokens,
    a meta.json of another format or cut short. Each is named; none is half-read."""
    out = build_token_store(synthetic_documents(10), TOK, tmp_path / "s")
    pristine = {p.name: p.read_bytes() for p in out.iterdir()}
    offsets = np.load(out / "train.offsets.npy")

    def refused(name: str, content: bytes, match: str) -> None:
        (out / name).write_bytes(content)
        with pytest.raises(ValueError, match=match):
            TokenStore(out, "train")
        (out / name).write_bytes(pristine[name])

    def npy(array) -> bytes:
        np.save(tmp_path / "array.npy", array)
        return (tmp_path / "array.npy").read_bytes()

    refused("train.offsets.npy", b"not an array", r"cannot read .*train\.offsets\.npy")
    refused("train.bytes.npy", npy(np.zeros(3, np.int64)), r"train\.bytes\.npy has shape \(3,\), expected")
    swapped = offsets.copy()
    swapped[[1, 2]] = swapped[[2, 1]]
    refused("train.offsets.npy", npy(swapped), "offsets.npy is not increasing from 0 to")
    refused("train.offsets.npy", npy(offsets - 1), "offsets.npy is not increasing from 0 to")
    meta = json.loads(pristine["meta.json"])
    refused("meta.json", json.dumps({**meta, "version": meta["version"] + 1}).encode(), "expected format .* version")
    refused("meta.json", pristine["meta.json"][:-5], r"meta\.json is corrupt")
    assert TokenStore(out, "train").n_docs == len(offsets) - 1  # restored: the store reads again


def test_missing_store_and_split_are_refused(tmp_path, synthetic_documents):
    with pytest.raises(FileNotFoundError, match="not a token store"):
        TokenStore(tmp_path, "train")
    out = build_token_store(synthetic_documents(10), TOK, tmp_path / "s")
    with pytest.raises(ValueError, match="'dev' not in"):
        TokenStore(out, "dev")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_token_store(["x", "y", "z"], TOK, out)
    build_token_store(["x", "y", "z"], TOK, out, overwrite=True)
    assert json.loads((out / "meta.json").read_text())["n_docs"] == 3


def test_large_vocab_uses_uint32(tmp_path, synthetic_documents):
    class WideTokenizer(ByteTokenizer):
        def __init__(self):
            super().__init__()
            self.vocab_size = 70_000

    out = build_token_store(synthetic_documents(5), WideTokenizer(), tmp_path / "s")
    assert TokenStore(out, "train").tokens.dtype == np.uint32


def test_bpe_store_round_trip(tmp_path, synthetic_documents):
    docs = synthetic_documents(20, max_len=200)
    tok = BPETokenizer.train(docs, vocab_size=320)
    out = build_token_store(docs, tok, tmp_path / "s")
    store = TokenStore(out, "train")
    assert store.tokenizer_fingerprint == tok.fingerprint() and store.eos_id == tok.eos_id
    texts = [tok.decode(store.document(i)) for i in range(store.n_docs)]
    assert set(texts) <= set(docs) and len(texts) == 18


def test_zero_fraction_split_is_empty(tmp_path, synthetic_documents):
    out = build_token_store(synthetic_documents(10), TOK, tmp_path / "s", split_fractions=(0.9, 0.1, 0.0))
    test = TokenStore(out, "test")
    assert test.n_docs == 0 and test.n_tokens == 0


def test_meta_records_each_split_hash(tmp_path, synthetic_documents):
    import hashlib

    out = build_token_store(synthetic_documents(10), TOK, tmp_path / "store")
    meta = json.loads((out / "meta.json").read_text())
    for split in SPLITS:
        assert meta["splits"][split]["sha256"] == hashlib.sha256((out / f"{split}.bin").read_bytes()).hexdigest()


def reference_split(documents, fractions=(0.9, 0.05, 0.05), seed=0) -> dict[str, list[str]]:
    """The split rule written out: a seeded permutation of the non-empty documents cut into the splits' sizes
    (proportional, largest remainders first), each split in corpus order."""
    docs = [d for d in documents if d]
    order = np.random.default_rng(seed).permutation(len(docs))
    wanted = [len(docs) * f for f in fractions]
    sizes = [int(w) for w in wanted]
    for i in sorted(range(3), key=lambda i: wanted[i] - sizes[i], reverse=True)[: len(docs) - sum(sizes)]:
        sizes[i] += 1
    bounds = np.cumsum([0] + sizes)
    return {split: [docs[i] for i in sorted(order[lo:hi])] for split, lo, hi in zip(SPLITS, bounds, bounds[1:])}


def user_corpus(root, n_files: int, chars: int, synthetic_documents) -> list:
    """Text files and a jsonl of records under root (some records empty); the paths to give UserDocuments."""
    texts = synthetic_documents(n_files, max_len=chars)
    root.mkdir()
    for i, text in enumerate(texts[: n_files // 2]):
        (root / f"doc{i:04d}.txt").write_text(text, encoding="utf-8")
    with open(root / "records.jsonl", "w", encoding="utf-8") as handle:
        for i, text in enumerate(texts[n_files // 2:]):
            handle.write(json.dumps({"text": text if i % 7 else ""}) + "\n")
    return [root]


def test_a_corpus_read_from_disk_pass_by_pass_gives_the_in_memory_store(tmp_path, synthetic_documents):
    """The trainer streams the user's files (UserDocuments, read afresh on each pass); the store is the one the
    documents held in memory give, byte for byte, and its split is the rule's (reference_split)."""
    from megalodon.data import DocumentSplits, UserDocuments, read_user_documents, split_documents

    paths = user_corpus(tmp_path / "corpus", 60, 300, synthetic_documents)
    streamed = build_token_store(UserDocuments(paths), TOK, tmp_path / "streamed", seed=5)
    in_memory = build_token_store(read_user_documents(paths), TOK, tmp_path / "in_memory", seed=5)
    for name in sorted(p.name for p in in_memory.iterdir()):
        assert (streamed / name).read_bytes() == (in_memory / name).read_bytes(), name
    documents = read_user_documents(paths)
    assert _split_texts(streamed) == reference_split(documents, seed=5) == split_documents(documents, seed=5)
    assert list(DocumentSplits(UserDocuments(paths), seed=5).split("val")) == reference_split(documents, seed=5)["val"]
    # a one-shot iterator is read into memory first, and gives the same store
    once = build_token_store(iter(documents), TOK, tmp_path / "once", seed=5)
    assert (once / "train.bin").read_bytes() == (in_memory / "train.bin").read_bytes()


def test_a_corpus_is_tokenized_without_holding_it(tmp_path, synthetic_documents, monkeypatch):
    """Building a store from files holds one encoding batch of text at a time, not the corpus: the peak of the
    Python heap while 5 MB of text is tokenized in batches of 16K characters stays under a third of it (measured:
    0.95 MB, 1.6 MB with batches of 64K; the same corpus as a list: 10.5 MB)."""
    import tracemalloc

    from megalodon.data import UserDocuments, token_store

    monkeypatch.setattr(token_store, "_ENCODE_BATCH_CHARS", 16_000)
    paths = user_corpus(tmp_path / "corpus", 400, 20_000, synthetic_documents)
    corpus_bytes = sum(p.stat().st_size for p in paths[0].iterdir())
    tracemalloc.start()
    try:
        build_token_store(UserDocuments(paths), TOK, tmp_path / "store")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    text_bytes = sum(len(text.encode()) for text in UserDocuments(paths))
    assert sum(TokenStore(tmp_path / "store", split).n_bytes for split in SPLITS) == text_bytes > 3_000_000
    assert peak < corpus_bytes / 3, f"peak {peak / 1e6:.2f} MB for {corpus_bytes / 1e6:.2f} MB of text"


def test_a_long_document_is_tokenized_in_parts_to_the_ids_of_the_whole(tmp_path, monkeypatch):
    """A document longer than an encoding batch (a 100 MB enwik8 is one) goes to the tokenizer in parts it can be
    cut into (Tokenizer.parts): the store is the one whole documents give, byte for byte, and no encoding call
    sees much more than a batch."""
    from megalodon.data import token_store

    rng = np.random.default_rng(0)
    words = ["the", "king's", "crown", "42", "naïve", "日本語", "!?", "--"]
    separators = [" ", " ", " ", "\n", "  ", "\t", ". "]
    long_docs = ["".join(rng.choice(words) + rng.choice(separators) for _ in range(n)) for n in (3000, 40, 1500)]
    tokenizers = {"byte": TOK, "bpe": BPETokenizer.train(long_docs, vocab_size=300)}
    for name, tokenizer in tokenizers.items():
        whole = build_token_store(long_docs * 4, tokenizer, tmp_path / f"{name}-whole", seed=1)
        seen = []
        encode_batch = tokenizer.encode_batch
        monkeypatch.setattr(token_store, "_ENCODE_BATCH_CHARS", 500)
        monkeypatch.setattr(tokenizer, "encode_batch", lambda texts: seen.extend(map(len, texts)) or
                            encode_batch(texts))
        parts = build_token_store(long_docs * 4, tokenizer, tmp_path / f"{name}-parts", seed=1)
        monkeypatch.undo()
        for file in sorted(p.name for p in whole.iterdir()):
            assert (parts / file).read_bytes() == (whole / file).read_bytes(), (name, file)
        assert max(seen) < 600 and len(seen) > 40, (name, max(seen), len(seen))


def test_files_that_change_between_the_passes_are_refused(tmp_path, synthetic_documents):
    from megalodon.data import UserDocuments

    paths = user_corpus(tmp_path / "corpus", 20, 100, synthetic_documents)
    documents = UserDocuments(paths)

    class Growing:  # the files as a user might edit them while the store is built: after the counting pass
        passes = 0

        def __iter__(self):
            yield from documents
            self.passes += 1
            if self.passes == 1:
                (paths[0] / "new.txt").write_text("an extra document", encoding="utf-8")
                documents.files.append(paths[0] / "new.txt")

    with pytest.raises(RuntimeError, match="changed while they were read"):
        build_token_store(Growing(), TOK, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_tokenizing_reports_its_progress_by_document(tmp_path, synthetic_documents, monkeypatch):
    """A large corpus takes minutes to tokenize: the build drives a progress bar (progress.py: tqdm on a terminal,
    log lines elsewhere, nothing within its first seconds) over the documents, to the last."""
    from megalodon.data import token_store
    from megalodon.progress import LogProgress

    bars = []

    def recorded(**options):
        bars.append(LogProgress(options["total"], options["desc"], delay=0.0, interval=1e9))
        return bars[-1]

    monkeypatch.setattr(token_store, "progress_bar", recorded)
    documents = synthetic_documents(30)
    build_token_store(documents, TOK, tmp_path / "store")
    assert [(bar.desc, bar.total, bar.n) for bar in bars] == [("tokenizing", 30, 30)]
