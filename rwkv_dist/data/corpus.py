"""Reading raw text corpora: plain text and JSONL files (optionally compressed), as a deterministic stream of documents.

Policy (documented in data/README.md):
- a `.txt` / `.md` / `.py` / any non-JSONL file is one document; a `.jsonl` file holds one document per line, its text in
  `--text-field` (default `text`); `.gz`, `.bz2`, `.xz` and `.zst` are decompressed on the fly (`x.jsonl.zst` is
  JSONL); archives and columnar files (.zip, .tar, .7z, .parquet, .arrow) are refused by name, not read as text;
- inputs are paths or globs, expanded and sorted, so the same inputs always give the same order;
- bytes that are not UTF-8 are replaced by U+FFFD and the document is counted in `invalid_utf8`;
- a UTF-8 byte-order mark opening a JSONL file is dropped (json.loads refuses it; it is no part of the first record);
- empty documents (no characters, or only whitespace) are skipped and counted in `empty`;
- bad input (`on_bad`): a file that cannot be read (missing, no permission, a damaged .gz), a JSONL line that is not
  JSON, a record without a string text field: `stop` raises one DataError naming file (and line); `skip` counts it
  (`unreadable_files`, `invalid_json_lines`, `missing_text_lines`) and goes on. A read failure in the middle of a file
  (a truncated .gz) keeps the documents before it.

A file may be read whole or as a byte range (a `Piece`) of a plain JSONL file cut at line starts, so that Ray tasks can
share a large file; the documents of a file's pieces, in order, are the documents of the whole file.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import sys
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import zstandard

from ..errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")


def _open_zstd(path: Path, mode: str = "rb"):
    """zstd's counterpart of gzip.open(path, "rb"), the only mode read here. zstandard's own reader has no readline():
    a buffer over it has one (and closing the buffer closes the file)."""
    assert mode == "rb", mode
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))


# Compressed inputs, by their last suffix: opened as a stream of the uncompressed bytes.
DECOMPRESS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": _open_zstd}
# Files that hold documents in a container this reader does not parse: read as text they would be bytes of garbage.
REFUSED_SUFFIXES = (".zip", ".tar", ".tgz", ".7z", ".rar", ".parquet", ".arrow", ".feather", ".lz4", ".zstd")
# What a damaged or truncated input raises: gzip and bz2 an OSError or EOFError, xz an LZMAError, zstd a ZstdError.
READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)
UTF8_BOM = b"\xef\xbb\xbf"
BAD_INPUT_POLICIES = ("stop", "skip")


@dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    empty: int = 0
    invalid_utf8: int = 0
    characters: int = 0
    unreadable_files: int = 0
    invalid_json_lines: int = 0
    missing_text_lines: int = 0
    duplicates: int = 0  # documents dropped by exact deduplication (set by the shard writers)
    first_problem: str = ""  # the first bad input skipped, for the report
    per_file: dict[str, int] = field(default_factory=dict)

    COUNTERS = ("files", "documents", "empty", "invalid_utf8", "characters", "unreadable_files", "invalid_json_lines",
                "missing_text_lines", "duplicates")

    def add(self, other: "CorpusStats") -> None:
        """Sum another part's counts into this one (parts are added in input order: first_problem stays the first)."""
        for name in self.COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.first_problem = self.first_problem or other.first_problem
        for k, v in other.per_file.items():
            self.per_file[k] = self.per_file.get(k, 0) + v

    def counts(self) -> dict[str, int | str]:
        return {name: getattr(self, name) for name in self.COUNTERS} | {"first_problem": self.first_problem}

    @classmethod
    def from_counts(cls, counts: dict) -> "CorpusStats":
        return cls(**{k: v for k, v in counts.items() if k in (*cls.COUNTERS, "first_problem")})

    @property
    def skipped_bad(self) -> int:
        return self.unreadable_files + self.invalid_json_lines + self.missing_text_lines

    def summary(self) -> str:
        """The counts a user wants after a prep, in one clause."""
        text = f"skipped {self.empty} empty documents, replaced bad UTF-8 in {self.invalid_utf8}"
        if self.skipped_bad:
            text += (f"; skipped bad input: {self.unreadable_files} unreadable files, {self.invalid_json_lines} "
                     f"invalid JSON lines, {self.missing_text_lines} lines without text (first: {self.first_problem})")
        return text


BUILTIN = "builtin:stdlib"


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Paths and globs -> the sorted list of files; one clear error for a pattern that matches nothing.
    `builtin:stdlib` stands for the embedded demo corpus (see builtin_corpus_files)."""
    files: list[Path] = []
    if not inputs:
        raise DataError("no --input given")
    for pattern in inputs:
        if pattern == BUILTIN:
            files.extend(builtin_corpus_files())
            continue
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if Path(m).is_file() or not glob.has_magic(pattern)]
        if not matches:
            raise DataError(f"{pattern}: no files match")
        for m in matches:
            if Path(m).is_dir():  # "no such file" would mislead: the folder is there, its files are not named
                raise DataError(f"{m}: is a folder; pass its files or a glob, e.g. '{Path(m) / '**' / '*.txt'}'")
            if not Path(m).is_file():
                raise DataError(f"{m}: no such file")
            if Path(m).name.lower().endswith(REFUSED_SUFFIXES):
                raise DataError(f"{m}: a {Path(m).suffix} file is not text or JSONL; extract its documents first "
                                f"(text, JSONL, optionally .gz/.bz2/.xz/.zst)")
            files.append(Path(m))
    return sorted(set(files), key=str)


def check_readable(files: list[Path]) -> None:
    """Under on_bad=stop, fail on the first file that cannot be opened (or whose .gz header is damaged) before any
    tokenizing starts: it costs one open and one small read per file."""
    for path in files:
        try:
            with _open(path) as f:
                f.read(1)
        except READ_ERRORS as e:
            raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _decode(raw: bytes, stats: CorpusStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8 += 1
        return raw.decode("utf-8", errors="replace")


def _open(path: Path):
    return DECOMPRESS.get(path.suffix, open)(path, "rb")


def is_jsonl(path: Path) -> bool:
    name = path.name[: -len(path.suffix)] if path.suffix in DECOMPRESS else path.name
    return name.endswith(JSONL_SUFFIXES)


def splittable(path: Path) -> bool:
    """Whether byte ranges of the file can be read on their own: plain (not compressed) JSONL."""
    return is_jsonl(path) and path.suffix not in DECOMPRESS


def line_start_at_or_after(path: Path, offset: int) -> int:
    """The byte offset of the first line of `path` that starts at or after `offset` (the file size if none does)."""
    if offset <= 0:
        return 0
    with open(path, "rb") as f:
        f.seek(offset - 1)
        f.readline()  # the rest of the line holding byte offset-1 (just its "\n" when a line starts at offset)
        return f.tell()


def _lines_before(path: Path, offset: int) -> int:
    """How many lines start before byte `offset` (a line start): used only to name a bad line of a later range."""
    count, left = 0, offset
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            count += chunk.count(b"\n")
            left -= len(chunk)
    return count


@dataclass(frozen=True)
class Piece:
    """A whole file (end None) or the bytes [start, end) of a plain JSONL file, start and end at line starts."""
    path: str
    start: int = 0
    end: int | None = None


def read_documents(files: list[Path], text_field: str = "text", stats: CorpusStats | None = None,
                   on_bad: str = "stop") -> Iterator[str]:
    """Every non-empty document of `files`, in order."""
    stats = stats if stats is not None else CorpusStats()
    for path in files:
        yield from read_piece(Piece(str(path)), text_field, stats, on_bad)


def read_piece(piece: Piece, text_field: str, stats: CorpusStats, on_bad: str = "stop") -> Iterator[str]:
    """Every non-empty document of one piece, in order (see the module's policy for bad input)."""
    if on_bad not in BAD_INPUT_POLICIES:
        raise DataError(f"bad-input policy must be one of {', '.join(BAD_INPUT_POLICIES)}, got {on_bad!r}")
    path = Path(piece.path)
    first_piece = piece.start == 0
    stats.files += first_piece  # a file cut into ranges counts once
    before = stats.documents

    def bad(where: str, message: str, counter: str) -> None:
        if on_bad == "stop":
            raise DataError(f"{where}: {message}")
        setattr(stats, counter, getattr(stats, counter) + 1)
        stats.first_problem = stats.first_problem or f"{where}: {message}"

    try:
        f = _open(path)
    except OSError as e:
        if first_piece:  # every range of an unopenable file fails alike; count the file once
            bad(str(path), f"cannot read ({type(e).__name__}: {e})", "unreadable_files")
        return
    with f:
        try:
            if is_jsonl(path):
                if piece.start:
                    f.seek(piece.start)
                pos, lineno = piece.start, 0
                while piece.end is None or pos < piece.end:
                    raw = f.readline()
                    if not raw:
                        break
                    at_start, pos = pos == 0, pos + len(raw)
                    lineno += 1
                    if at_start and raw.startswith(UTF8_BOM):  # editors on Windows start files with one
                        raw = raw[len(UTF8_BOM):]
                    if not raw.strip():
                        continue

                    def where() -> str:
                        return f"{path}:{lineno + (_lines_before(path, piece.start) if piece.start else 0)}"

                    try:
                        record = json.loads(_decode(raw, stats))
                    except json.JSONDecodeError as e:
                        bad(where(), f"not valid JSON ({e.msg})", "invalid_json_lines")
                        continue
                    if not isinstance(record, dict) or text_field not in record:
                        keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                        bad(where(), f"no text field {text_field!r} (has: {keys})", "missing_text_lines")
                        continue
                    text = record[text_field]
                    if not isinstance(text, str):
                        bad(where(), f"text field must be a string, got {type(text).__name__}", "missing_text_lines")
                        continue
                    yield from _emit(text, stats)
            else:
                yield from _emit(_decode(f.read(), stats), stats)
        except READ_ERRORS as e:  # damaged or truncated: gzip raises BadGzipFile (an OSError) or EOFError
            bad(str(path), f"cannot read ({type(e).__name__}: {e})", "unreadable_files")
    stats.per_file[str(path)] = stats.per_file.get(str(path), 0) + stats.documents - before


def _emit(text: str, stats: CorpusStats) -> Iterator[str]:
    if not text.strip():
        stats.empty += 1
        return
    stats.documents += 1
    stats.characters += len(text)
    yield text


def dedup_key(text: str) -> bytes:
    """What exact deduplication compares: the text in Unicode NFC with every run of whitespace turned into one space
    and the ends stripped (copies that differ only in line endings, trailing spaces or re-wrapping are the same
    document), hashed to 16 bytes (blake2b-128: no collision is expected below ~10^18 documents). Case is kept: code
    and names differ by case."""
    normalized = " ".join(unicodedata.normalize("NFC", text).split())
    return hashlib.blake2b(normalized.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def file_identity(path: Path) -> list:
    """(size, mtime_ns) of a file: a finished prep task is reused only while its inputs are unchanged."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def builtin_corpus_files(max_bytes: int = 4_000_000) -> list[Path]:
    """The demo corpus: Python standard-library modules of this interpreter (PSF-licensed source and docstrings),
    sorted by path and cut at `max_bytes`. Deterministic for a given Python version; no network needed."""
    stdlib = Path(sys.modules["json"].__file__).resolve().parents[1]
    chosen, total = [], 0
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("[a-z]*/*.py")):
        if "test" in path.parts[-2:][0] or path.name.startswith("test"):
            continue
        size = path.stat().st_size
        if total + size > max_bytes:
            continue
        chosen.append(path)
        total += size
    return chosen
