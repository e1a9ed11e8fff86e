"""WebDataset shards of tokenized documents, and the manifest that is their source of truth.

One sample per document: key `{index:012d}`, field `tokens.u16` (or `tokens.u32` when the vocabulary exceeds 65535)
holding the token ids as raw little-endian integers (no pickle anywhere). The manifest lists every shard with its
sample count, token count and sha256, the tokenizer's hash and the split; webdataset alone silently drops samples
of a damaged tar, so readers check shards against the manifest before using them.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import DataError
from .corpus import CorpusStats, dedup_key
from .tokenizer import MODEL_FILE, Tokenizer

MANIFEST = "manifest.json"


def _wds():
    """webdataset, imported on first use: it imports torch (seconds), which tokenizing and planning never need."""
    import webdataset

    return webdataset

FORMAT = "rwkv_dist.shards/1"
SPLITS = ("train", "val")


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str
    samples: int = Field(ge=0)
    tokens: int = Field(ge=0)
    sha256: str


class TokenizerEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str
    sha256: str
    vocab_size: int
    eod_id: int


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["rwkv_dist.shards/1"]
    tokenizer: TokenizerEntry
    dtype: Literal["uint16", "uint32"]
    shard_tokens: int
    val_fraction: float
    splits: dict[str, list[ShardEntry]]
    stats: dict[str, int]

    @property
    def identity(self) -> str:
        """What the dataset is, wherever it is stored: a hash of its tokenizer, token type and every shard (name,
        counts, sha256) of every split. A copy elsewhere has the same identity; a re-prepared dataset does not."""
        content = {"tokenizer": self.tokenizer.sha256, "dtype": self.dtype,
                   "splits": {k: [e.model_dump() for e in v] for k, v in sorted(self.splits.items())}}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def shards(self, split: str) -> list[ShardEntry]:
        if split not in self.splits:
            raise DataError(f"manifest has no split {split!r} (has: {', '.join(self.splits)})")
        return self.splits[split]


def shard_url(location: str, file: str) -> str:
    """Where a shard (or the manifest) of a dataset lives: `location` is a directory, a URL prefix, or a template with
    `{}` for the file name (e.g. `pipe:curl -s https://host/data/{}`, any URL webdataset's gopen takes)."""
    return location.format(file) if "{}" in location else f"{location.rstrip('/')}/{file}"


def read_bytes(url: str) -> bytes:
    with _wds().gopen(url, "rb") as f:
        return f.read()


def load_manifest(location: str | Path) -> Manifest:
    url = shard_url(str(location), MANIFEST)
    try:
        raw = read_bytes(url)
    except Exception as e:  # noqa: BLE001 - gopen raises many types (OSError, IOError from pipes, ...)
        raise DataError(f"{url}: cannot read the dataset manifest ({type(e).__name__}: {e})") from None
    try:
        return Manifest.model_validate(json.loads(raw))
    except (json.JSONDecodeError, ValidationError) as e:
        raise DataError(f"{url}: not a valid manifest ({str(e).splitlines()[0]})") from None


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


class ShardTar:
    """One shard being written: samples in key order, then its manifest entry (sha256 of the finished file)."""

    def __init__(self, path: Path, dtype: str):
        self.path, self.field = Path(path), "tokens.u16" if dtype == "uint16" else "tokens.u32"
        self.little_endian = np.dtype(dtype).newbyteorder("<")
        # fixed mtime/owner: the same input gives byte-identical tars
        self.writer = _wds().TarWriter(str(self.path), encoder=False, mtime=0.0, user="rwkv", group="rwkv")
        self.samples = self.tokens = 0

    def add(self, key: str, ids) -> None:
        self.writer.write({"__key__": key, self.field: np.asarray(ids, dtype=self.little_endian).tobytes()})
        self.samples += 1
        self.tokens += len(ids)

    def close(self, name: str) -> ShardEntry:
        self.writer.close()
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        return ShardEntry(file=name, samples=self.samples, tokens=self.tokens, sha256=digest)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


class _SplitWriter:
    """Writes one split's shards, starting a new tar when the current one holds shard_tokens tokens (a shard closes
    after the document that brings it to shard_tokens; prep.layout_shards makes the same cut)."""

    def __init__(self, out: Path, split: str, shard_tokens: int, dtype: str):
        self.out, self.split, self.shard_tokens, self.dtype = out, split, shard_tokens, dtype
        self.entries: list[ShardEntry] = []
        self.tar: ShardTar | None = None

    def write(self, key: str, ids: list[int]) -> None:
        if self.tar is None:
            self.tar = ShardTar(self.out / shard_name(self.split, len(self.entries)), self.dtype)
        self.tar.add(key, ids)
        if self.tar.tokens >= self.shard_tokens:
            self.close()

    def close(self) -> None:
        if self.tar is not None:
            self.entries.append(self.tar.close(self.tar.path.name))
            self.tar = None

    def abandon(self) -> None:
        """Close the open tar after a failure (its file is deleted with the staging folder): a tar stream left open
        would try to write into its closed file when garbage-collected."""
        if self.tar is not None:
            self.tar.writer.close()
            self.tar = None


def manifest_stats(stats: CorpusStats, tokens: int, dedup: bool) -> dict[str, int]:
    """The corpus counts a manifest records (one function, so every writer records them in the same order)."""
    counts = {"files": stats.files, "documents": stats.documents, "empty_documents": stats.empty,
              "invalid_utf8_documents": stats.invalid_utf8, "unreadable_files": stats.unreadable_files,
              "invalid_json_lines": stats.invalid_json_lines, "missing_text_lines": stats.missing_text_lines}
    if dedup:  # absent, not 0, when nobody looked for duplicates
        counts["duplicate_documents"] = stats.duplicates
    return counts | {"tokens": tokens}


def make_manifest(tokenizer: Tokenizer, shard_tokens: int, val_fraction: float, splits: dict[str, list[ShardEntry]],
                  stats: dict[str, int]) -> Manifest:
    return Manifest(
        format=FORMAT,
        tokenizer=TokenizerEntry(file=MODEL_FILE, sha256=tokenizer.sha256, vocab_size=tokenizer.vocab_size,
                                 eod_id=tokenizer.eod_id),
        dtype=token_dtype(tokenizer.vocab_size), shard_tokens=shard_tokens, val_fraction=val_fraction,
        splits=splits, stats=stats,
    )


def check_prep_args(shard_tokens: int, val_fraction: float) -> None:
    if shard_tokens < 1:
        raise DataError(f"shards: --shard-tokens must be positive, got {shard_tokens}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"shards: --val-fraction must be in [0, 1), got {val_fraction}")


def check_corpus_result(documents: int, train_shards: int, val_fraction: float) -> None:
    if documents == 0:
        raise DataError("shards: the corpus has no non-empty documents")
    if not train_shards:
        raise DataError(f"shards: --val-fraction {val_fraction} left no training documents")


def is_val(text: str, val_fraction: float) -> bool:
    """Split by content hash: stable under reordering, and duplicates land in the same split."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return h / 2**64 < val_fraction


def write_shards(documents: Iterable[str], tokenizer: Tokenizer, out_dir: str | Path, stats: CorpusStats,
                 shard_tokens: int = 10_000_000, val_fraction: float = 0.0, workers: int = 1,
                 batch_docs: int = 256, progress=None, dedup: bool = False) -> Manifest:
    """Tokenize `documents` (sentencepiece's threads: `workers`) into shards under out_dir, then write the manifest.
    With `dedup`, a document whose normalized text (corpus.dedup_key) was seen before is dropped and counted.

    Everything is written in a staging folder next to out_dir and moved in at the end, so a failure leaves no partial
    dataset; an existing dataset (a manifest in out_dir) is never overwritten. `rwkv-dist data shards --ray`
    (prep.prepare_shards) writes the same bytes from many tasks."""
    check_prep_args(shard_tokens, val_fraction)
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise DataError(f"{out}: already holds a dataset ({MANIFEST}); choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    seen: set[bytes] = set()

    def unique(docs: Iterable[str]) -> Iterator[str]:
        for text in docs:
            key = dedup_key(text)
            if key in seen:
                stats.duplicates += 1
                continue
            seen.add(key)
            yield text

    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _SplitWriter(staging, s, shard_tokens, dtype) for s in SPLITS}
    try:
        index = total_tokens = 0
        try:
            for batch in _batches(unique(documents) if dedup else documents, batch_docs):
                for text, ids in zip(batch, tokenizer.encode(batch, num_threads=workers)):
                    writers["val" if is_val(text, val_fraction) else "train"].write(f"{index:012d}", ids)
                    index += 1
                    total_tokens += len(ids)
                if progress is not None:
                    progress(len(batch), total_tokens)
        except BaseException:
            for w in writers.values():
                w.abandon()
            raise
        for w in writers.values():
            w.close()
        check_corpus_result(index, len(writers["train"].entries), val_fraction)
        shutil.copyfile(tokenizer.path, staging / MODEL_FILE)
        manifest = make_manifest(tokenizer, shard_tokens, val_fraction, {s: w.entries for s, w in writers.items()},
                                 manifest_stats(stats, total_tokens, dedup))
        (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == MANIFEST):  # the manifest last: it commits
            path.replace(out / path.name)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _batches(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class ShardDamaged(DataError):
    """A shard that does not match its manifest entry."""


def decode_shard(data: bytes, entry: ShardEntry, dtype: str, vocab_size: int, url: str) -> list[np.ndarray]:
    """The documents of one shard's bytes, in key order, after checking them against the manifest entry."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise ShardDamaged(f"{url}: sha256 {digest[:12]}… does not match the manifest's {entry.sha256[:12]}…")
    try:
        tariterators = _wds().tariterators
        files = ({**f, "__url__": url} for f in tariterators.tar_file_iterator(io.BytesIO(data)))
        samples = list(tariterators.group_by_keys(files))
    except Exception as e:  # noqa: BLE001 - tarfile raises several types on garbage
        raise ShardDamaged(f"{url}: unreadable tar ({type(e).__name__}: {e})") from None
    field = "tokens.u16" if dtype == "uint16" else "tokens.u32"
    little = np.dtype(dtype).newbyteorder("<")
    docs = []
    for sample in samples:
        raw = sample.get(field)
        if raw is None or len(raw) % little.itemsize:
            raise ShardDamaged(f"{url}: sample {sample.get('__key__')!r} has no valid {field} field")
        ids = np.frombuffer(raw, dtype=little)
        if ids.size and int(ids.max()) >= vocab_size:
            raise ShardDamaged(f"{url}: sample {sample['__key__']!r} has token id {int(ids.max())} >= vocab {vocab_size}")
        docs.append(ids)
    tokens = sum(len(d) for d in docs)
    if len(docs) != entry.samples or tokens != entry.tokens:
        raise ShardDamaged(f"{url}: {len(docs)} samples / {tokens} tokens, manifest says {entry.samples} / {entry.tokens}")
    return docs


def read_shard(location: str, manifest: Manifest, entry: ShardEntry) -> list[np.ndarray]:
    url = shard_url(location, entry.file)
    try:
        data = read_bytes(url)
    except Exception as e:  # noqa: BLE001
        raise ShardDamaged(f"{url}: cannot read ({type(e).__name__}: {e})") from None
    return decode_shard(data, entry, manifest.dtype, manifest.tokenizer.vocab_size, url)


def verify(location: str | Path) -> tuple[list[str], list[str]]:
    """Check every shard of a dataset against its manifest: (report lines, names of damaged shards)."""
    location = str(location)
    manifest = load_manifest(location)
    lines, damaged = [], []
    for split, entries in manifest.splits.items():
        for entry in entries:
            try:
                read_shard(location, manifest, entry)
                lines.append(f"ok       {entry.file}  {entry.samples} samples  {entry.tokens} tokens")
            except ShardDamaged as e:
                lines.append(f"DAMAGED  {entry.file}  {e}")
                damaged.append(entry.file)
    return lines, damaged


def check_same_tokenizer(manifest: Manifest, expected_sha256: str, location: str, expected_from: str) -> None:
    """The one tokenizer check: the dataset at `location` must have been made with the tokenizer of `expected_from`."""
    if manifest.tokenizer.sha256 != expected_sha256:
        raise DataError(f"{location}: made with tokenizer {manifest.tokenizer.sha256[:12]}…, {expected_from} uses "
                        f"{expected_sha256[:12]}…")
