"""Our tokenizers as transformers `PreTrainedTokenizerFast`, so that `AutoTokenizer.from_pretrained` loads them.

Both kinds export, and encode and decode exactly as the originals:
- BPE: its own `tokenizer.json`, with bos/eos/pad declared as the special tokens.
- Byte: an equivalent `tokenizers` model built here: byte-level BPE with the 256 byte symbols as ids 0..255,
  no merges, then <bos>=256, <eos>=257, <pad>=258 (the ids of `ByteTokenizer`). Its tokenizer_config.json also
  carries our byte tokenizer's marker, so that `load_tokenizer` reads it back as a `ByteTokenizer`.
Text that contains a special token's spelling (say "<eos>") stays text, as in our tokenizers
(`split_special_tokens=True`). Padding is on the left, which is what batched generation needs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from megalodon.data.tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

MARKER_KEY = "megalodon_tokenizer"  # the tokenizer_config.json key by which load_tokenizer recognizes ByteTokenizer


def to_hf_tokenizer(tokenizer: Tokenizer | str | Path) -> PreTrainedTokenizerFast:
    """A transformers tokenizer equivalent to `tokenizer` (one of ours, or a directory that holds one)."""
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    marker = {}
    if isinstance(tokenizer, ByteTokenizer):
        backend = _byte_backend(tokenizer)
        names = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
        marker = {MARKER_KEY: ByteTokenizer.KIND}  # an unknown key to transformers: kept, saved, and ignored
    elif isinstance(tokenizer, BPETokenizer):
        backend = _bpe_backend(tokenizer)
        names = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
                 "pad_token": tokenizer.pad_token}
    else:
        raise TypeError(f"cannot export a {type(tokenizer).__name__}: expected a ByteTokenizer or BPETokenizer")
    names = {key: value for key, value in names.items() if value is not None}
    return PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=True, padding_side="left",
                                   **names, **marker)


def save_hf_tokenizer(tokenizer: Tokenizer | str | Path, directory: str | Path) -> PreTrainedTokenizerFast:
    """Write `tokenizer.json` + `tokenizer_config.json` that AutoTokenizer (and our load_tokenizer) read."""
    hf_tokenizer = to_hf_tokenizer(tokenizer)
    hf_tokenizer.save_pretrained(str(directory))
    return hf_tokenizer


def _bpe_backend(tokenizer: BPETokenizer) -> BackendTokenizer:
    # Round trip through the tokenizer's own saved file: a private copy, and no reach into its internals.
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save(scratch)
        return BackendTokenizer.from_file(str(Path(scratch) / TOKENIZER_FILE))


def _byte_backend(tokenizer: ByteTokenizer) -> BackendTokenizer:
    # ByteLevel writes each byte as one printable symbol (GPT-2's table); with no merges every byte stays its
    # own token, and this vocabulary gives byte b the id b.
    vocab = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<bos>", "<eos>", "<pad>"])  # ids 256, 257, 258, as in ByteTokenizer
    expected = {"<bos>": tokenizer.bos_id, "<eos>": tokenizer.eos_id, "<pad>": tokenizer.pad_id}
    if any(backend.token_to_id(token) != i for token, i in expected.items()):
        raise RuntimeError(f"the exported byte tokenizer does not reproduce the special ids {expected}")
    return backend
