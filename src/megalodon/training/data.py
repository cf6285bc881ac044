"""Corpus -> tokenizer -> token store, cached under the data directory so that later runs start at once."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from megalodon.data import (BUILTIN_CORPORA, BPETokenizer, ByteTokenizer, DocumentSplits, Tokenizer, TokenStore,
                            UserDocuments, build_token_store, load_corpus, load_tokenizer)
from megalodon.training.config import TrainConfig
from megalodon.training.run_dir import exclusive, remove_stale_temporaries

logger = logging.getLogger(__name__)


def _corpus_source(cfg: TrainConfig) -> str | list[str]:
    if cfg.data in BUILTIN_CORPORA:
        return cfg.data
    paths = [p.strip() for p in cfg.data.split(",") if p.strip()]
    missing = [p for p in paths if not Path(p).exists()]
    if not paths or missing:
        raise FileNotFoundError(f"data {cfg.data!r}: no such file or directory {missing or cfg.data!r}; give a "
                                f"built-in corpus ({', '.join(BUILTIN_CORPORA)}) or paths to .txt, .md or .jsonl "
                                "files (plain, .gz or .zst), .parquet or .arrow files, or directories of them")
    return paths


def files_key(paths: list[str]) -> str:
    """A key that changes when any file under `paths` changes: the path, size and modification time of each
    file (everything under a directory, so an unrelated file there costs a rebuild, never a stale store)."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            digest.update(f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def prepare_data(cfg: TrainConfig) -> tuple[Path, Tokenizer]:
    """The token store directory and tokenizer for this config, building them on first use.

    The store's name holds everything that shapes it: the corpus (for your own files, their paths, sizes and
    modification times), the tokenizer and the split seed. Edited files therefore get a new store. One process
    builds a store while others wait for it (a lock file per store)."""
    source = _corpus_source(cfg)
    data_key = source if isinstance(source, str) else f"user-{files_key(source)}"
    if cfg.tokenizer in ("byte", "bpe"):
        tok_key = "byte" if cfg.tokenizer == "byte" else f"bpe{cfg.vocab_size}"
    elif Path(cfg.tokenizer).is_dir():  # a model directory (init_from) too: its weights do not shape the store
        tok_key = f"tok-{files_key([str(p) for p in Path(cfg.tokenizer).glob('tokenizer*.json')])}"
    elif Path(cfg.tokenizer).exists():
        tok_key = f"tok-{files_key([cfg.tokenizer])}"
    else:
        raise FileNotFoundError(f"tokenizer {cfg.tokenizer!r}: no such file or directory; give bpe, byte, or the path "
                                "of a tokenizer.json or a tokenizer directory")
    stores = Path(cfg.data_dir) / "stores"
    stores.mkdir(parents=True, exist_ok=True)
    store_dir = stores / f"{data_key}-{tok_key}-s{cfg.seed}"
    remove_stale_temporaries(stores)
    with exclusive(stores / f".{store_dir.name}.lock"):
        tokenizer_dir = store_dir / "tokenizer"
        if (store_dir / "meta.json").is_file() and tokenizer_dir.is_dir():
            return store_dir, load_tokenizer(tokenizer_dir)
        logger.info("building the token store %s from %s (once: later runs reuse it)", store_dir, cfg.data)
        tokenizer = _build_store(cfg, source, store_dir)
        if isinstance(source, list) and f"user-{files_key(source)}" != data_key:
            shutil.rmtree(store_dir)  # its name says files that no longer exist as they are
            raise RuntimeError(f"the training files ({cfg.data}) changed while their token store was built: run "
                               "again to build it from the files as they are now")
    return store_dir, tokenizer


def _build_store(cfg: TrainConfig, source, store_dir: Path) -> Tokenizer:
    # the user's files are read from disk on each pass, never held: they may be larger than memory
    corpora = Path(cfg.data_dir) / "corpora"
    documents = UserDocuments(source) if isinstance(source, list) else load_corpus(source, corpora)
    if cfg.tokenizer == "byte":
        tokenizer = ByteTokenizer()
    elif cfg.tokenizer == "bpe":
        # Trained on the train split only, so that validation text is truly unseen.
        train_docs = DocumentSplits(documents, seed=cfg.seed).split("train")
        logger.info("training a %d-token byte-level BPE on the train split", cfg.vocab_size)
        tokenizer = BPETokenizer.train(train_docs, vocab_size=cfg.vocab_size)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
    # overwrite: a store a crash left without its tokenizer is rebuilt
    build_token_store(documents, tokenizer, store_dir, seed=cfg.seed, overwrite=True)
    tokenizer.save(store_dir / "tokenizer")
    return tokenizer


def open_splits(store_dir: Path) -> tuple[TokenStore, TokenStore]:
    train, val = TokenStore(store_dir, "train"), TokenStore(store_dir, "val")
    if train.n_tokens == 0:
        raise ValueError(f"the train split of {store_dir} is empty")
    return train, val
