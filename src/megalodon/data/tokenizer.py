"""Tokenizers behind one small interface: a byte tokenizer for tests and a byte-level BPE for real runs."""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Iterator, Sequence

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
DEFAULT_SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")

# Names that common tokenizer.json files use for their special tokens, tried in order.
_EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>")
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "<|im_start|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>")

# A space between two non-space characters. GPT-2's pre-tokenization (byte-level BPE's) ends a pre-token before such
# a space and starts the next one with it, whatever follows; BPE merges stay inside pre-tokens, so text cut there
# encodes, part by part, to the ids of the whole.
_BETWEEN_WORDS = re.compile(r"(?<=\S) (?=\S)")
_TRAIN_PART_CHARS = 1_000_000  # a long document reaches the BPE trainer in parts of about this many characters


class Tokenizer(ABC):
    """Text <-> token ids; `encode` adds no special tokens (the token store appends eos itself)."""

    vocab_size: int
    eos_id: int
    bos_id: int | None
    pad_id: int | None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens are dropped."""

    @abstractmethod
    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer into `directory` so that `load_tokenizer(directory)` restores it."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Short hash that changes whenever the id <-> text mapping changes (recorded by token stores)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts; subclasses override this when they can do it faster."""
        return [self.encode(t) for t in texts]

    def parts(self, text: str, size: int) -> Iterator[str]:
        """`text` in consecutive parts of about `size` characters whose encodings, laid end to end, are
        `encode(text)`, so that a long document is encoded in bounded memory. This default never cuts: a
        tokenizer that knows where its encoding can be cut says so."""
        yield text

    @property
    def special_ids(self) -> set[int]:
        """Ids of bos/eos/pad that exist for this tokenizer."""
        return {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}


def _short_hash(data: str) -> str:
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then <bos>=256, <eos>=257, <pad>=258 (vocab 259); needs no training."""

    KIND = "megalodon-byte"

    def __init__(self) -> None:
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 258
        self.vocab_size = 259

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text`."""
        return list(text.encode("utf-8"))

    def parts(self, text: str, size: int) -> Iterator[str]:
        """Any cut between characters keeps the bytes."""
        for start in range(0, max(len(text), 1), size):
            yield text[start:start + size]

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; invalid UTF-8 (e.g. a window cut inside a character) becomes U+FFFD."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary [0, {self.vocab_size})")
            if i < 256:
                out.append(i)
        return out.decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> Path:
        """Write the marker file `tokenizer_config.json`; there is nothing else to save."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_FILE
        path.write_text(json.dumps({"megalodon_tokenizer": self.KIND, "vocab_size": self.vocab_size}, indent=2))
        return path

    def fingerprint(self) -> str:
        """Constant: the byte mapping never changes."""
        return _short_hash(f"{self.KIND}:{self.vocab_size}")


class BPETokenizer(Tokenizer):
    """Byte-level BPE from Hugging Face `tokenizers` (lossless on any text, no unknown tokens)."""

    def __init__(self, hf_tokenizer, eos_token: str, bos_token: str | None = None, pad_token: str | None = None):
        self._tok = hf_tokenizer
        # Text that happens to contain "<eos>" must stay text, not become the special id. (tokenizers 0.15.0 has no
        # such switch, yet takes the assignment without a word: ask the class.)
        if not hasattr(type(hf_tokenizer), "encode_special_tokens"):
            import tokenizers

            raise RuntimeError(f"tokenizers {tokenizers.__version__} would turn a literal {eos_token!r} in text into "
                               "the special token: pip install 'tokenizers>=0.15.1'")
        self._tok.encode_special_tokens = True
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token, self.bos_token, self.pad_token = eos_token, bos_token, pad_token
        self.eos_id = self._require_id(eos_token)
        self.bos_id = None if bos_token is None else self._require_id(bos_token)
        self.pad_id = None if pad_token is None else self._require_id(pad_token)
        self._cuts_between_words = _pre_tokenizes_like_gpt2(hf_tokenizer)

    def _require_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @classmethod
    def train(
        cls,
        documents: Iterable[str],
        vocab_size: int = 8192,
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        min_frequency: int = 2,
    ) -> "BPETokenizer":
        """Train a byte-level BPE; `special_tokens` are (bos, eos, pad) and get the first ids."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        if len(special_tokens) != 3:
            raise ValueError(f"special_tokens must be (bos, eos, pad), got {list(special_tokens)}")
        if vocab_size < 256 + len(special_tokens):
            minimum = 256 + len(special_tokens)
            raise ValueError(f"vocab_size must be >= {minimum} (256 bytes + specials), got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable even if unseen
            show_progress=False,
        )
        # streamed, a long document in parts: the corpus need not fit in memory, nor one document's words in Rust's
        parts = (part for text in documents for part in _cut_between_words(text, _TRAIN_PART_CHARS))
        tok.train_from_iterator(parts, trainer)
        bos, eos, pad = special_tokens
        return cls(tok, eos_token=eos, bos_token=bos, pad_token=pad)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
    ) -> "BPETokenizer":
        """Load any `tokenizer.json`; special tokens come from the arguments, a sibling
        tokenizer_config.json, or common names, in that order (eos is required, bos/pad are optional)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception
            raise ValueError(f"{path} is not a valid Hugging Face tokenizer.json: {err}") from err
        config = _read_hf_config(path.parent / CONFIG_FILE)
        vocab = tok.get_vocab(with_added_tokens=True)

        def pick(given: str | None, key: str, names: tuple[str, ...]) -> str | None:
            if given is not None:
                return given
            configured = config.get(key)
            if isinstance(configured, dict):  # HF sometimes stores {"content": "</s>", ...}
                configured = configured.get("content")
            if isinstance(configured, str) and configured in vocab:
                return configured
            return next((n for n in names if n in vocab), None)

        eos = pick(eos_token, "eos_token", _EOS_NAMES)
        if eos is None:
            raise ValueError(
                f"could not find an end-of-document token in {path}; tried {list(_EOS_NAMES)}. "
                "Pass eos_token=... naming one of its tokens."
            )
        return cls(tok, eos, pick(bos_token, "bos_token", _BOS_NAMES), pick(pad_token, "pad_token", _PAD_NAMES))

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text` (no bos/eos added, even if the tokenizer.json has a post-processor)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Parallel encoding in Rust."""
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # _fast skips offsets
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def parts(self, text: str, size: int) -> Iterator[str]:
        """Cut between words where the pipeline is GPT-2's (byte-level BPE trained here, GPT-2's own); any other
        pipeline (a normalizer, another pre-tokenizer, added tokens that could match across a cut) is not cut."""
        if self._cuts_between_words:
            yield from _cut_between_words(text, size)
        else:
            yield text

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` plus an HF-style tokenizer_config.json naming the special tokens
        (so `transformers.PreTrainedTokenizerFast.from_pretrained(directory)` also works)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        self._tok.save(str(path))
        # split_special_tokens: text that spells "<eos>" stays text under transformers too, as in encode().
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                  "split_special_tokens": True}
        config.update({k: v for k, v in (("bos_token", self.bos_token), ("pad_token", self.pad_token)) if v})
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return path

    def fingerprint(self) -> str:
        """Hash of the serialized tokenizer."""
        return _short_hash(self._tok.to_str())


def _pre_tokenizes_like_gpt2(hf_tokenizer) -> bool:
    """No normalizer, a byte-level pre-tokenizer with GPT-2's regex and no prefix space, and no added tokens but
    the special ones (which encode_special_tokens keeps as text): then _BETWEEN_WORDS cuts keep the ids."""
    from tokenizers import pre_tokenizers

    pre = hf_tokenizer.pre_tokenizer
    added = getattr(hf_tokenizer, "get_added_tokens_decoder", None)
    return (hf_tokenizer.normalizer is None and isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex
            and not pre.add_prefix_space and added is not None and all(t.special for t in added().values()))


def _cut_between_words(text: str, size: int) -> Iterator[str]:
    """`text` in parts of at least `size` characters (the last one aside), each cut just before a _BETWEEN_WORDS
    space; a text with no such space after `size` characters stays whole."""
    start = 0
    while len(text) - start > size:
        cut = _BETWEEN_WORDS.search(text, start + size)
        if cut is None:
            break
        yield text[start:cut.start()]
        start = cut.start()
    yield text[start:]


def _read_hf_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by `Tokenizer.save`, or any HF `tokenizer.json` (file or its directory)."""
    path = Path(path)
    if path.is_file():
        if path.name == CONFIG_FILE:
            path = path.parent
        else:
            return BPETokenizer.from_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer at {path}")
    config = _read_hf_config(path / CONFIG_FILE)
    if config.get("megalodon_tokenizer") == ByteTokenizer.KIND:
        return ByteTokenizer()
    if (path / TOKENIZER_FILE).is_file():
        return BPETokenizer.from_file(path / TOKENIZER_FILE)
    raise FileNotFoundError(
        f"{path} holds neither {TOKENIZER_FILE} (BPE) nor a byte-tokenizer {CONFIG_FILE}; "
        "copy the tokenizer files of the model it came from into it (for an imported reference checkpoint: "
        "`megalodon convert from-reference ... --tokenizer PATH`), or save one with Tokenizer.save(directory)"
    )
