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


def test_a_single_document_is_cut_into_pieces(tmp_path):
    book = "".join(f"line {i}\n" for i in range(100))
    out = build_token_store([book], TOK, tmp_path / "s")
    pieces = [p for split in _split_texts(out).values() for p in split]
    assert len(pieces) == 3 and all(p and p in book and p.endswith("\n") for p in pieces)
    assert sum(map(len, pieces)) == len(book)


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
