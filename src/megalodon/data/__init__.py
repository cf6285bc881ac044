"""Data pipeline: corpora -> tokenizer -> on-disk token store -> chunk-aligned, stateful batches."""

from .batching import IGNORE_INDEX, Batch, PackedBatcher, bits_per_byte, eval_windows
from .corpora import (
    BUILTIN_CORPORA,
    fetch_shakespeare,
    load_austen,
    load_bible,
    load_corpus,
    load_shakespeare,
    strip_gutenberg_boilerplate,
)
from .token_store import SPLITS, DocumentSplits, TokenStore, build_token_store, split_documents
from .tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer
from .user_documents import UserDocuments, read_user_documents

__all__ = [
    "BUILTIN_CORPORA", "IGNORE_INDEX", "SPLITS",
    "Batch", "BPETokenizer", "ByteTokenizer", "DocumentSplits", "PackedBatcher", "Tokenizer", "TokenStore",
    "UserDocuments",
    "bits_per_byte", "build_token_store", "eval_windows", "fetch_shakespeare", "load_austen", "load_bible",
    "load_corpus", "load_shakespeare", "load_tokenizer", "read_user_documents", "split_documents",
    "strip_gutenberg_boilerplate",
]
