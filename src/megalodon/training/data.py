"""Corpus -> tokenizer -> token store, cached under the data directory so that later runs start at once."""

from __future__ import annotations

import hashlib
from pathlib import Path

from megalodon.data import (BUILTIN_CORPORA, BPETokenizer, ByteTokenizer, Tokenizer, TokenStore, build_token_store,
                            load_corpus, load_tokenizer, split_documents)
from megalodon.training.config import TrainConfig


def _corpus_source(cfg: TrainConfig) -> str | list[str]:
    if cfg.data in BUILTIN_CORPORA:
        return cfg.data
    paths = [p.strip() for p in cfg.data.split(",") if p.strip()]
    missing = [p for p in paths if not Path(p).exists()]
    if not paths or missing:
        raise FileNotFoundError(f"data {cfg.data!r}: no such file or directory {missing or cfg.data!r}; give a "
                                f"built-in corpus ({', '.join(BUILTIN_CORPORA)}) or paths to .txt/.jsonl files")
    return paths


def _slug(cfg: TrainConfig, source) -> str:
    if isinstance(source, str):
        return source
    digest = hashlib.sha256("\n".join(str(Path(p).resolve()) for p in source).encode()).hexdigest()[:10]
    return f"user-{digest}"


def prepare_data(cfg: TrainConfig) -> tuple[Path, Tokenizer]:
    """The token store directory and tokenizer for this config, building them on first use."""
    source = _corpus_source(cfg)
    data_dir = Path(cfg.data_dir)
    if cfg.tokenizer == "byte":
        tok_key = "byte"
    elif cfg.tokenizer == "bpe":
        tok_key = f"bpe{cfg.vocab_size}"
    else:
        tok_key = "user-" + hashlib.sha256(str(Path(cfg.tokenizer).resolve()).encode()).hexdigest()[:10]
    store_dir = data_dir / "stores" / f"{_slug(cfg, source)}-{tok_key}-s{cfg.seed}"
    tokenizer_dir = store_dir / "tokenizer"
    if (store_dir / "meta.json").is_file():
        return store_dir, load_tokenizer(tokenizer_dir)

    documents = load_corpus(source, data_dir / "corpora")
    if not any(documents):
        raise ValueError(f"data {cfg.data!r} holds no text")
    if cfg.tokenizer == "byte":
        tokenizer = ByteTokenizer()
    elif cfg.tokenizer == "bpe":
        # Trained on the train split only, so that validation text is truly unseen.
        train_docs = split_documents(documents, seed=cfg.seed)["train"]
        tokenizer = BPETokenizer.train(train_docs, vocab_size=cfg.vocab_size)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
    build_token_store(documents, tokenizer, store_dir, seed=cfg.seed)
    tokenizer.save(tokenizer_dir)
    return store_dir, tokenizer


def open_splits(store_dir: Path) -> tuple[TokenStore, TokenStore]:
    train, val = TokenStore(store_dir, "train"), TokenStore(store_dir, "val")
    if train.n_tokens == 0:
        raise ValueError(f"the train split of {store_dir} is empty")
    return train, val
