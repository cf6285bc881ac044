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


def _corpus_source(data: str, option: str = "data") -> str | list[str]:
    if data in BUILTIN_CORPORA:
        return data
    paths = [p.strip() for p in data.split(",") if p.strip()]
    missing = [p for p in paths if not Path(p).exists()]
    if not paths or missing:
        raise FileNotFoundError(f"{option} {data!r}: no such file or directory {missing or data!r}; give a "
                                f"built-in corpus ({', '.join(BUILTIN_CORPORA)}) or paths to .txt, .md or .jsonl "
                                "files (plain, .gz or .zst), .parquet or .arrow files, or directories of them")
    return paths


def _source_key(source: str | list[str]) -> str:
    return source if isinstance(source, str) else f"user-{files_key(source)}"


def _documents(cfg: TrainConfig, source: str | list[str]):
    # the user's files are read from disk on each pass, never held: they may be larger than memory
    return UserDocuments(source) if isinstance(source, list) else load_corpus(source, Path(cfg.data_dir) / "corpora")


def _split_fractions(cfg: TrainConfig) -> tuple[float, float, float]:
    """Every document of data trains when val_data gives the validation documents."""
    return (1.0, 0.0, 0.0) if cfg.val_data else (0.9, 0.05, 0.05)


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
    modification times), the tokenizer, the split seed, and whether val_data takes the validation's place. Edited
    files therefore get a new store. One process builds a store while others wait for it (a lock file per
    store)."""
    source = _corpus_source(cfg.data)
    if cfg.val_data:
        _corpus_source(cfg.val_data, "val_data")  # a missing file named before the training store is built
    if cfg.tokenizer in ("byte", "bpe"):
        tok_key = "byte" if cfg.tokenizer == "byte" else f"bpe{cfg.vocab_size}"
    elif Path(cfg.tokenizer).is_dir():  # a model directory (init_from) too: its weights do not shape the store
        tok_key = f"tok-{files_key([str(p) for p in Path(cfg.tokenizer).glob('tokenizer*.json')])}"
    elif Path(cfg.tokenizer).exists():
        tok_key = f"tok-{files_key([cfg.tokenizer])}"
    else:
        raise FileNotFoundError(f"tokenizer {cfg.tokenizer!r}: no such file or directory; give bpe, byte, or the path "
                                "of a tokenizer.json or a tokenizer directory")
    key = _source_key(source)
    store_dir = _stores(cfg) / f"{key}-{tok_key}-s{cfg.seed}{'-all' if cfg.val_data else ''}"
    built = _cached_store(store_dir, source, key, cfg.data, lambda: _build_store(cfg, source, store_dir),
                          with_tokenizer=True)
    return store_dir, built if built is not None else load_tokenizer(store_dir / "tokenizer")


def open_splits(cfg: TrainConfig, store_dir: Path, tokenizer: Tokenizer) -> tuple[TokenStore, TokenStore]:
    """The run's train split, and its validation: the store's val split, or val_data's documents (tokenized with
    the run's tokenizer, in a store of their own)."""
    train = TokenStore(store_dir, "train")
    if train.n_tokens == 0:
        raise ValueError(f"the train split of {store_dir} is empty")
    if not cfg.val_data:
        return train, TokenStore(store_dir, "val")
    source = _corpus_source(cfg.val_data, "val_data")
    key = _source_key(source)
    val_dir = _stores(cfg) / f"val-{key}-{tokenizer.fingerprint()}"

    def build():
        build_token_store(_documents(cfg, source), tokenizer, val_dir, split_fractions=(0.0, 1.0, 0.0),
                          overwrite=True)

    _cached_store(val_dir, source, key, cfg.val_data, build, with_tokenizer=False)
    return train, TokenStore(val_dir, "val")


def _stores(cfg: TrainConfig) -> Path:
    stores = Path(cfg.data_dir) / "stores"
    stores.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(stores)
    return stores


def _cached_store(store_dir: Path, source, key: str, given: str, build, with_tokenizer: bool):
    """build() under the store's lock unless the store is there whole (its tokenizer too, with_tokenizer); its
    result, None when the store was there. A store whose files changed while it was built (their key is no
    longer `key`) is removed, and the error says to run again."""
    with exclusive(store_dir.parent / f".{store_dir.name}.lock"):
        if (store_dir / "meta.json").is_file() and (not with_tokenizer or (store_dir / "tokenizer").is_dir()):
            return None
        logger.info("building the token store %s from %s (once: later runs reuse it)", store_dir, given)
        result = build()
        if isinstance(source, list) and _source_key(source) != key:
            shutil.rmtree(store_dir)  # its name says files that no longer exist as they are
            raise RuntimeError(f"the files of {given} changed while their token store was built: run again to "
                               "build it from the files as they are now")
    return result


def _build_store(cfg: TrainConfig, source, store_dir: Path) -> Tokenizer:
    documents = _documents(cfg, source)
    fractions = _split_fractions(cfg)
    if cfg.tokenizer == "byte":
        tokenizer = ByteTokenizer()
    elif cfg.tokenizer == "bpe":
        # Trained on the train split only, so that validation text is truly unseen.
        train_docs = DocumentSplits(documents, fractions, seed=cfg.seed).split("train")
        logger.info("training a %d-token byte-level BPE on the train split", cfg.vocab_size)
        tokenizer = BPETokenizer.train(train_docs, vocab_size=cfg.vocab_size)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
    # overwrite: a store a crash left without its tokenizer is rebuilt
    build_token_store(documents, tokenizer, store_dir, fractions, seed=cfg.seed, overwrite=True)
    tokenizer.save(store_dir / "tokenizer")
    return tokenizer
