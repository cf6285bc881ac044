import json

import pytest
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

from megalodon.data import BPETokenizer, ByteTokenizer, load_tokenizer

TEXT = "Hello, wörld! ✓ 日本語 😀\n\ttabs <eos> and <pad> stay text"
CORPUS = ["the quick brown fox jumps over the lazy dog. " * 20, "To be, or not to be: that is the question.\n" * 20,
          "Ünïcödé text ✓ 😀 mixed in. " * 20]


def test_byte_round_trip_unicode():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert max(ids) < 256 and tok.decode(ids) == TEXT
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)


def test_byte_decode_drops_specials_and_replaces_broken_utf8():
    tok = ByteTokenizer()
    assert tok.decode([tok.bos_id] + tok.encode("ab") + [tok.eos_id, tok.pad_id]) == "ab"
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # a window can cut a character in half
    with pytest.raises(ValueError, match="outside"):
        tok.decode([259])


def test_bpe_train_save_load_round_trip(tmp_path):
    tok = BPETokenizer.train(CORPUS, vocab_size=300)
    assert tok.vocab_size <= 300 and (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.decode(tok.encode(TEXT)) == TEXT  # byte-level: lossless even on unseen characters
    assert tok.eos_id not in tok.encode(TEXT)  # a literal "<eos>" in text is not the special token
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.encode(TEXT) == tok.encode(TEXT) and loaded.fingerprint() == tok.fingerprint()
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert tok.encode_batch([TEXT, "x"]) == [tok.encode(TEXT), tok.encode("x")]


def test_bpe_trains_from_a_stream_as_from_a_list():
    """The trainer streams a corpus from disk into the BPE (never a list of it): the same tokenizer, and an error
    raised while reading (a bad jsonl line) reaches the caller as it was."""
    streamed = BPETokenizer.train((text for text in CORPUS), vocab_size=300)
    assert streamed.fingerprint() == BPETokenizer.train(list(CORPUS), vocab_size=300).fingerprint()

    def unreadable():
        yield CORPUS[0]
        raise ValueError("corpus.jsonl:2: invalid JSON")

    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: invalid JSON"):
        BPETokenizer.train(unreadable(), vocab_size=300)


def random_text(rng, n_words: int) -> str:
    """Words of every pre-token class (letters, digits, punctuation, contractions, marks) between every kind of
    whitespace, Unicode's and Python's, which disagree on \\x1c-\\x1f."""
    words = ["the", "cat's", "I'll", "42", "3.14", "é", "e\u0301", "日本語", "²", "Ⅷ", "!!", "'", "...", "_x", "😀",
             "<eos>"]
    spaces = [" ", "  ", "\n", "\t", "\r\n", "\u00a0", "\u2028", "\u3000", "\x1c", "\u180e", "\u200b", "\u0085"]
    return "".join(rng.choice(words) + (rng.choice(spaces) if rng.random() < 0.8 else "") for _ in range(n_words))


def test_a_text_encodes_in_parts_to_the_ids_of_the_whole():
    """Tokenizer.parts cuts where the encoding does not change: the byte tokenizer anywhere, a byte-level BPE just
    before a space between two non-spaces. (Cut before any whitespace instead, about a third of these texts
    encode otherwise.) A pipeline it cannot reason about is not cut."""
    import random

    rng = random.Random(0)
    bpe = BPETokenizer.train([random_text(rng, 400) for _ in range(20)], vocab_size=400)
    for tokenizer in (ByteTokenizer(), bpe):
        for _ in range(200):
            text, size = random_text(rng, rng.randint(1, 150)), rng.randint(1, 40)
            parts = list(tokenizer.parts(text, size))
            assert "".join(parts) == text
            assert [i for part in parts for i in tokenizer.encode(part)] == tokenizer.encode(text), text
        long = random_text(rng, 2000)
        assert len(list(tokenizer.parts(long, 100))) > 10
    with_prefix = HFTokenizer.from_str(bpe._tok.to_str())
    with_prefix.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # each part would gain a space
    assert len(list(BPETokenizer(with_prefix, eos_token="<eos>").parts(long, 100))) == 1


def test_a_long_document_trains_the_bpe_in_parts_as_whole(monkeypatch):
    import random

    from megalodon.data import tokenizer as tokenizer_module

    rng = random.Random(1)
    corpus = [random_text(rng, 3000), random_text(rng, 50)]
    whole = BPETokenizer.train(corpus, vocab_size=350)
    monkeypatch.setattr(tokenizer_module, "_TRAIN_PART_CHARS", 200)
    assert BPETokenizer.train(corpus, vocab_size=350).fingerprint() == whole.fingerprint()


def test_a_tokenizers_release_that_would_turn_literal_specials_into_ids_is_refused():
    """tokenizers 0.15.0 has no encode_special_tokens switch, yet accepts the assignment silently: the class is
    asked instead, and the error names the release that has it."""
    trained = BPETokenizer.train(CORPUS, vocab_size=300)

    class Old:  # a stand-in for 0.15.0's Tokenizer: same methods, no switch
        def __init__(self, wrapped):
            self.wrapped = wrapped

        def __getattr__(self, name):
            return getattr(self.wrapped, name)

    with pytest.raises(RuntimeError, match=r"tokenizers>=0\.15\.1"):
        BPETokenizer(Old(trained._tok), trained.eos_token)


def test_load_tokenizer_dispatch(tmp_path):
    ByteTokenizer().save(tmp_path / "byte")
    BPETokenizer.train(CORPUS, vocab_size=300).save(tmp_path / "bpe")
    assert isinstance(load_tokenizer(tmp_path / "byte"), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "bpe"), BPETokenizer)
    assert isinstance(load_tokenizer(tmp_path / "bpe" / "tokenizer.json"), BPETokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def _user_tokenizer(path, specials):
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path))


def test_user_tokenizer_json_finds_common_special_names(tmp_path):
    _user_tokenizer(tmp_path / "mine.json", ["<s>", "</s>"])
    tok = load_tokenizer(tmp_path / "mine.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, None)


def test_user_tokenizer_config_names_eos(tmp_path):
    _user_tokenizer(tmp_path / "tokenizer.json", ["<|custom_end|>", "</s>"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|custom_end|>"}}))
    assert load_tokenizer(tmp_path).eos_id == 0


def test_user_tokenizer_without_eos_is_refused(tmp_path):
    _user_tokenizer(tmp_path / "mine.json", ["[UNK]"])
    with pytest.raises(ValueError, match="eos_token"):
        load_tokenizer(tmp_path / "mine.json")
    assert BPETokenizer.from_file(tmp_path / "mine.json", eos_token="[UNK]").eos_id == 0
