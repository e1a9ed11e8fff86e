"""Reading raw text corpora: plain text and JSONL files (optionally .gz), as a deterministic stream of documents.

Policy (documented in data/README.md):
- a `.txt` / `.md` / `.py` / any non-JSONL file is one document; a `.jsonl` file holds one document per line, its text in
  `--text-field` (default `text`); `.gz` is decompressed on the fly;
- inputs are paths or globs, expanded and sorted, so the same inputs always give the same order;
- bytes that are not UTF-8 are replaced by U+FFFD and the document is counted in `invalid_utf8`;
- empty documents (no characters, or only whitespace) are skipped and counted in `empty`.
"""

from __future__ import annotations

import glob
import gzip
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")


@dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    empty: int = 0
    invalid_utf8: int = 0
    characters: int = 0
    per_file: dict[str, int] = field(default_factory=dict)


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
            if not Path(m).is_file():
                raise DataError(f"{m}: no such file")
            files.append(Path(m))
    return sorted(set(files), key=str)


def _decode(raw: bytes, stats: CorpusStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8 += 1
        return raw.decode("utf-8", errors="replace")


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def is_jsonl(path: Path) -> bool:
    return path.name.endswith(JSONL_SUFFIXES)


def read_documents(files: list[Path], text_field: str = "text", stats: CorpusStats | None = None) -> Iterator[str]:
    """Every non-empty document of `files`, in order."""
    stats = stats if stats is not None else CorpusStats()
    for path in files:
        stats.files += 1
        before = stats.documents
        with _open(path) as f:
            if is_jsonl(path):
                for lineno, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        record = json.loads(_decode(raw, stats))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(record, dict) or text_field not in record:
                        keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                        raise DataError(f"{path}:{lineno}: no text field {text_field!r} (has: {keys})")
                    yield from _emit(record[text_field], stats, f"{path}:{lineno}")
            else:
                yield from _emit(_decode(f.read(), stats), stats, str(path))
        stats.per_file[str(path)] = stats.documents - before


def _emit(text, stats: CorpusStats, where: str) -> Iterator[str]:
    if not isinstance(text, str):
        raise DataError(f"{where}: text field must be a string, got {type(text).__name__}")
    if not text.strip():
        stats.empty += 1
        return
    stats.documents += 1
    stats.characters += len(text)
    yield text


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
