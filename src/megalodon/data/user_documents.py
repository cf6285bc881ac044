"""The user's own documents: text and markdown files (one document each) and JSON Lines (one document per
record's "text"), plain or compressed (.gz; .zst with Python 3.14's compression.zstd or the `zstandard`
package), and Parquet and Arrow files (one document per row's "text", with pyarrow: Hugging Face datasets'
shards and `save_to_disk` directories), read from disk a file at a time, on every pass afresh."""

from __future__ import annotations

import gzip
import importlib
import io
import json
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
TABLE_SUFFIXES = (".parquet", ".arrow")
USER_SUFFIXES = TEXT_SUFFIXES + TABLE_SUFFIXES
COMPRESSED_SUFFIXES = (".gz", ".zst")  # of the text suffixes' files; Parquet and Arrow compress themselves
PARQUET_ROWS = 1024  # rows read at a time


def document_suffix(path: Path) -> str | None:
    """The kind of documents a file holds (.txt, .md, .jsonl, whatever its compression, .parquet or .arrow), or
    None."""
    if path.suffix in TABLE_SUFFIXES:
        return path.suffix
    suffixes = path.suffixes[-2:]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes and suffixes[-1] in TEXT_SUFFIXES else None


class UserDocuments:
    """The documents of the user's files and directories, read from disk afresh on each iteration, one file at a
    time: a corpus larger than memory can be tokenized pass after pass (the token store's build makes two).

    A .jsonl gives one document per line (its "text" field), a .parquet or .arrow one per row (its "text" column),
    any other file one document; directories are searched recursively for *.txt, *.md, *.jsonl (and their .gz and
    .zst forms), *.parquet and *.arrow, in sorted order. Documents of only whitespace are skipped; finding none at
    all is an error."""

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = [Path(p) for p in paths]
        self.files: list[Path] = []
        for path in self.paths:
            if path.is_dir():
                self.files.extend(sorted(p for p in path.rglob("*") if p.is_file() and document_suffix(p)))
            elif path.is_file():
                _refuse_json(path)
                self.files.append(path)
            else:
                raise FileNotFoundError(f"document path does not exist: {path}")

    def __iter__(self) -> Iterator[str]:
        found = False
        for file in self.files:
            kind = document_suffix(file)
            reader = {".jsonl": _read_jsonl, ".parquet": _read_parquet, ".arrow": _read_arrow}.get(kind)
            texts = reader(file) if reader else [_read_text(file)]
            for text in texts:
                if text.strip():
                    found = True
                    yield text
        if not found:
            raise ValueError(f"no non-empty documents found in {[str(p) for p in self.paths]} (looked for "
                             f"{', '.join(USER_SUFFIXES)}; text and jsonl also as {' or '.join(COMPRESSED_SUFFIXES)})")


def _refuse_json(path: Path) -> None:
    """A .json file would be read as one text document, its JSON syntax and all: most often JSON Lines misnamed
    (C4's shards are *.json.gz), which would train on the syntax without a word of warning."""
    name = path.name.removesuffix(path.suffix) if path.suffix in COMPRESSED_SUFFIXES else path.name
    if name.endswith(".json"):
        raise ValueError(f"{path}: a .json file is not read (it would be one document of JSON syntax). JSON Lines "
                         "with a \"text\" field: name it .jsonl (for instance .jsonl.gz for C4's *.json.gz shards)")


def read_user_documents(paths: Sequence[str | Path]) -> list[str]:
    """Every document of UserDocuments(paths), in memory."""
    return list(UserDocuments(paths))


def _open(path: Path) -> BinaryIO:
    """The file's bytes, decompressed as its last suffix says."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        try:
            from compression import zstd  # Python 3.14

            return zstd.open(path, "rb")
        except ImportError:
            pass
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"{path} is zstd-compressed: reading it needs Python 3.14, or the zstandard package "
                              "(pip install 'megalodon-torch[corpora]'); or decompress it with `zstd -d`") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _decompression_errors() -> tuple[type[Exception], ...]:
    errors: list[type[Exception]] = [OSError, EOFError, zlib.error]  # gzip's BadGzipFile is an OSError
    for module in ("compression.zstd", "zstandard"):
        try:
            errors.append(importlib.import_module(module).ZstdError)
        except ImportError:
            pass
    return tuple(errors)


def _damaged(path: Path, error: Exception, line_no: int | None = None) -> ValueError | None:
    """The error to raise for a compressed file that does not decompress; None for any other error."""
    if path.suffix not in COMPRESSED_SUFFIXES or not isinstance(error, _decompression_errors()) or \
            isinstance(error, (FileNotFoundError, PermissionError)):  # the file, not its contents
        return None
    where = "" if line_no is None else f" after line {line_no}"
    return ValueError(f"{path} could not be decompressed{where} ({error}): a damaged or truncated file?")


def _read_text(path: Path) -> str:
    try:
        with _open(path) as handle:
            data = handle.read()
    except Exception as error:
        if damaged := _damaged(path, error):
            raise damaged from error
        raise
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not valid UTF-8 text ({error})") from error


def _read_jsonl(path: Path) -> Iterator[str]:
    """The "text" of each record, a line at a time. Records end at a newline only: a U+2028 or a form feed inside a
    string is part of the text (str.splitlines would cut the record there)."""
    line_no = 0
    try:
        with _open(path) as handle:
            for line_no, raw in enumerate(handle, start=1):
                yield from _record_text(path, line_no, raw)
    except Exception as error:
        if damaged := _damaged(path, error, line_no):
            raise damaged from error
        raise


def _record_text(path: Path, line_no: int, raw: bytes) -> Iterator[str]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}:{line_no}: not valid UTF-8 text ({err.reason} at byte {err.start})") from None
    if not line.strip():
        return
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from err
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f'{path}:{line_no}: expected an object with a string "text" field')
    yield record["text"]


def _pyarrow(path: Path, kind: str):
    try:
        import pyarrow as pa
    except ImportError:
        raise ImportError(f"{path} is {kind} file: reading it needs pyarrow (pip install "
                          "'megalodon-torch[corpora]')") from None
    return pa


def _text_column(path: Path, schema) -> int:
    """The index of the string column "text" in `schema`; a ValueError naming what is there instead."""
    pa = _pyarrow(path, "a table")
    if "text" not in schema.names:
        raise ValueError(f"{path} has no \"text\" column (its columns: {', '.join(schema.names)}): the documents "
                         "are read from a string column named text")
    kind = schema.field("text").type
    string_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow 16 and later
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or string_view(kind)):
        raise ValueError(f"{path}: the \"text\" column holds {kind}, not strings")
    return schema.get_field_index("text")


def _rows_of(path: Path, batches: Iterator, column: int) -> Iterator[str]:
    """The text of each row, a record batch at a time; a null is an empty document."""
    pa = _pyarrow(path, "a table")
    try:
        for batch in batches:
            for text in batch.column(column).to_pylist():
                yield text or ""
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path} could not be read to its end ({error}): a damaged or truncated file?") from None


def _read_parquet(path: Path) -> Iterator[str]:
    """The "text" column, PARQUET_ROWS rows at a time."""
    pa = _pyarrow(path, "a Parquet")
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path} is not a readable Parquet file ({error})") from None
    _text_column(path, table.schema_arrow)
    yield from _rows_of(path, table.iter_batches(batch_size=PARQUET_ROWS, columns=["text"]), 0)


def _read_arrow(path: Path) -> Iterator[str]:
    """The "text" column of an Arrow IPC file, a record batch at a time: the stream format, which Hugging Face
    datasets writes (save_to_disk's data-*.arrow, its cache files), or the random-access file format."""
    pa = _pyarrow(path, "an Arrow")
    try:
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_stream(source)
                batches = iter(reader)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            column = _text_column(path, reader.schema)
            yield from _rows_of(path, batches, column)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path} is not a readable Arrow file ({error})") from None
