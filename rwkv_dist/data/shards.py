"""WebDataset shards of tokenized documents, and the manifest that is their source of truth.

One sample per document: key `{index:012d}`, field `tokens.u16` (or `tokens.u32` when the vocabulary exceeds 65535)
holding the token ids as raw little-endian integers (no pickle anywhere). The manifest lists every shard with its
sample count, token count and sha256, the tokenizer's hash and the split; webdataset alone silently drops samples
of a damaged tar, so readers check shards against the manifest before using them. A reader hashes a local shard once
per process (ShardCache: again whenever the file changes) and unpacks the plain tars our writers make without tarfile,
the token ids being zero-copy views into the shard's bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Literal
from urllib.parse import urlparse

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import DataError, check_out_folder
from .corpus import CorpusStats, dedup_key
from .tokenizer import MODEL_FILE, Tokenizer

MANIFEST = "manifest.json"


def _wds():
    """webdataset, imported on first use: it imports torch (seconds), which tokenizing and planning never need."""
    import webdataset

    return webdataset

FORMAT = "rwkv_dist.shards/1"
SPLITS = ("train", "val")


# A manifest's file names are joined to the dataset's location, which may be a `pipe:` shell command template: a plain
# name only, so that a manifest from elsewhere can neither run a command (`x; rm -rf ~`) nor read outside the dataset.
PLAIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
SHARD_FILE = re.compile(r"^(train|val)-\d{6}\.tar$")


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str = Field(pattern=PLAIN_NAME)
    samples: int = Field(ge=0)
    tokens: int = Field(ge=0)
    sha256: str


class TokenizerEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str = Field(pattern=PLAIN_NAME)
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
    except (ValueError, ValidationError) as e:  # ValueError: JSON syntax, or bytes that are not UTF-8
        from ..config import describe  # pydantic's errors as `field.path: message (got value)`: names the field

        reason = describe(e) if isinstance(e, ValidationError) else str(e).splitlines()[0]
        raise DataError(f"{url}: not a valid manifest ({reason[:300]})") from None


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


def check_out(out: Path) -> None:
    """--out must be absent, an empty folder, or one a prep of this dataset left (shards, the tokenizer, temporary
    files): never a dataset (it would be replaced) nor a folder of other files (shards would be mixed into it)."""
    if (out / MANIFEST).exists():
        raise DataError(f"{out}: already holds a dataset ({MANIFEST}); choose another --out or remove it")
    if out.exists():
        if not out.is_dir():
            raise DataError(f"{out}: exists and is not a folder")
        foreign = [p.name for p in sorted(out.iterdir())
                   if not (SHARD_FILE.match(p.name) or p.name == MODEL_FILE or p.name.endswith(".tmp"))]
        if foreign:
            raise DataError(f"{out}: not empty and not a dataset being prepared (holds {foreign[0]}); choose another "
                            f"--out")
    check_out_folder(out, "shards: --out", DataError)


def check_prep_args(shard_tokens: int, val_fraction: float) -> None:
    if shard_tokens < 1:
        raise DataError(f"shards: --shard-tokens must be positive, got {shard_tokens}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"shards: --val-fraction must be in [0, 1), got {val_fraction}")


def check_corpus_result(documents: int, train_shards: int, val_fraction: float,
                        stats: CorpusStats | None = None) -> None:
    if documents == 0:  # with --on-bad-input skip, say what was skipped: "no documents" alone misleads then
        skipped = f" ({stats.summary()})" if stats is not None and (stats.skipped_bad or stats.empty) else ""
        raise DataError(f"shards: the corpus has no non-empty documents{skipped}")
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
    check_out(out)
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
        check_corpus_result(index, len(writers["train"].entries), val_fraction, stats)
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


_COMPRESSED = (b"\x1f\x8b\x08", b"BZh", b"\x5d\x00\x00\x80", b"\xfd7zXZ")  # what tarfile's "r|*" would unpack
_ZERO_BLOCK = bytes(512)
_PAX_IGNORED = frozenset({b"mtime", b"atime", b"ctime", b"uid", b"gid", b"uname", b"gname"})
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset.tariterators' defaults, which decode_shard's fallback uses
_BASE_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_RESERVED = frozenset({"__key__", "__url__", "__local_path__", "__bad__"})


def _octal(field: bytes) -> int | None:
    if field[:1] in (b"\x80", b"\xff"):  # base-256 numbers: left to tarfile
        return None
    digits = field.split(b"\0", 1)[0].strip()
    if digits.strip(b"01234567"):
        return None
    return int(digits or b"0", 8)


def _pax_records(records: bytes) -> tuple[str | None, int | None] | None:
    """(path, size) from the records of a pax header, None unless every record is a well-formed one we know."""
    pos, path, size = 0, None, None
    while pos < len(records):
        space = records.find(b" ", pos)
        if space <= pos or not records[pos:space].isdigit():
            return None
        end = pos + int(records[pos:space])
        if end > len(records) or end <= space + 1 or records[end - 1] != 0x0A:
            return None
        keyword, eq, value = records[space + 1 : end - 1].partition(b"=")
        if not eq:
            return None
        if keyword == b"path":
            if not value.isascii():
                return None
            path = value.decode("ascii")
        elif keyword == b"size":
            if not value.isdigit():
                return None
            size = int(value)
        elif keyword not in _PAX_IGNORED:
            return None
        pos = end
    return path, size


def _plain_tar_samples(data: bytes) -> list[dict] | None:
    """The samples webdataset reads from `data` (tarfile "r|*", tar_file_iterator, group_by_keys), each field a
    zero-copy memoryview into `data`, without tarfile's per-member Python work; None for anything but the plain layout
    our writers make (ustar regular files, each optionally after a pax header of simple records; a clean end). The
    caller then hands `data` to webdataset itself, so damaged, compressed or unusual tars get exactly its treatment."""
    view, n = memoryview(data), len(data)
    if n == 0 or data[:6].startswith(_COMPRESSED):
        return None
    samples: list[dict] = []
    current: dict | None = None
    off, pax = 0, None  # pax: (path, size) of the pax header before the next member
    headers, chksums = [], []  # checked together at the end: a bad one anywhere hands the whole tar to webdataset
    while off < n:
        if off + 512 > n:
            return None
        header = data[off : off + 512]
        if header == _ZERO_BLOCK:
            if pax is not None:
                return None
            break
        chksum = _octal(header[148:156])
        if chksum is None:
            return None
        headers.append(off // 512)
        chksums.append(chksum)
        if header[257:265] != b"ustar\x0000" or header[345] != 0:  # POSIX ustar, no name prefix
            return None
        kind, size = header[156], _octal(header[124:136])
        if size is None:
            return None
        start = off + 512
        if kind == 0x78:  # "x": a pax header for the next member
            if pax is not None or start + size > n:
                return None
            pax = _pax_records(data[start : start + size])
            if pax is None:
                return None
            off = start + (size + 511) // 512 * 512
            continue
        if kind not in (0x30, 0x00):  # "0" or "\0": only regular files
            return None
        name = header[:100].split(b"\0", 1)[0]
        if not name.isascii():
            return None
        name = name.decode("ascii")
        if pax is not None:
            name, size = pax[0] if pax[0] is not None else name, pax[1] if pax[1] is not None else size
            pax = None
        if start + size > n or name.endswith("/"):
            return None
        off = start + (size + 511) // 512 * 512
        if ("/" not in name and name.startswith("__") and name.endswith("__")) or _SKIP_META.match(name):
            continue
        match = _BASE_EXT.match(name)
        if not match:
            continue
        prefix, suffix = match.group(1), match.group(2).lower()
        if current is None or prefix != current["__key__"]:
            current = {"__key__": prefix}
            samples.append(current)
        if suffix in current or suffix in _RESERVED:
            return None  # webdataset raises on a duplicate
        current[suffix] = view[start : start + size]
    if headers:  # tarfile's unsigned checksum: the header's bytes, its checksum field counted as 8 spaces
        blocks = np.frombuffer(data, dtype=np.uint8, count=n // 512 * 512).reshape(-1, 512)[headers]
        sums = blocks.sum(axis=1, dtype=np.int64) - blocks[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
        if not np.array_equal(sums, np.array(chksums, dtype=np.int64)):
            return None
    return samples


class ShardCache:
    """The local shard files this process has matched with a manifest sha256, so that each is hashed once per process
    rather than once per epoch. An entry holds the file's (device, inode, size, mtime_ns, ctime_ns), the same before
    and after reading it from the open file, and the sha256 it matched. Writing to a file, renaming another onto its
    path or touching it changes one of these (ctime is set by the kernel, no program can set it back), so the file is
    hashed again. Racy git's caveat: two writes within one tick of the file system's clock can leave the same times,
    so a file is remembered only once its ctime is `settle_ns` older than the start of the read; until then (a file
    just written) it is hashed on every read."""

    def __init__(self, settle_ns: int = 2_000_000_000):
        self.settle_ns = settle_ns
        self._verified: dict[str, tuple] = {}
        self.hashes = 0  # reads that had to compute the sha256

    def clear(self) -> None:
        self._verified.clear()

    def read(self, path: str) -> tuple[bytes, tuple | None]:
        """The file's bytes, and its identity if it was stable during the read and settled (else None)."""
        began = time.time_ns()
        with open(path, "rb") as f:
            before = _identity(os.fstat(f.fileno()))
            data = f.read()
            after = _identity(os.fstat(f.fileno()))
        settled = before == after and after[4] < began - self.settle_ns and len(data) == after[2]
        return data, (os.path.abspath(path), *after) if settled else None

    def known(self, identity: tuple | None, sha256: str) -> bool:
        return identity is not None and self._verified.get(identity[0]) == (*identity[1:], sha256)

    def remember(self, identity: tuple | None, sha256: str) -> None:
        if identity is not None:
            self._verified[identity[0]] = (*identity[1:], sha256)


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


SHARD_CACHE = ShardCache()


def _local_path(url: str) -> str | None:
    """The file a shard URL names when webdataset's gopen would simply open() it, else None."""
    if url == "-" or os.environ.get("GOPEN_REWRITE") or urlparse(url).scheme:
        return None
    if getattr(_wds().utils, "enforce_security", False):  # gopen refuses local files then: let it say so
        return None
    return url


def read_shard(location: str, manifest: Manifest, entry: ShardEntry, trust_cache: bool = True) -> list[np.ndarray]:
    """The documents of one shard (views into its bytes), checked against the manifest. A local file this process has
    already matched with entry.sha256 and that has not changed since (SHARD_CACHE) is not hashed again, unless
    trust_cache is False."""
    url = shard_url(location, entry.file)
    path = _local_path(url)
    try:
        data, identity = SHARD_CACHE.read(path) if path is not None else (read_bytes(url), None)
    except Exception as e:  # noqa: BLE001
        raise ShardDamaged(f"{url}: cannot read ({type(e).__name__}: {e})") from None
    verified = trust_cache and SHARD_CACHE.known(identity, entry.sha256)
    if not verified:
        SHARD_CACHE.hashes += 1
    docs = decode_shard(data, entry, manifest.dtype, manifest.tokenizer.vocab_size, url, verified=verified)
    SHARD_CACHE.remember(identity, entry.sha256)
    return docs


def decode_shard(data: bytes, entry: ShardEntry, dtype: str, vocab_size: int, url: str,
                 verified: bool = False) -> list[np.ndarray]:
    """The documents of one shard's bytes, in key order, after checking them against the manifest entry: read-only
    views into `data` (no copy). `verified`: the caller has already matched these bytes with entry.sha256
    (ShardCache), so the hash is not computed again."""
    if not verified:
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise ShardDamaged(f"{url}: sha256 {digest[:12]}… does not match the manifest's {entry.sha256[:12]}…")
    samples = _plain_tar_samples(data)
    if samples is None:  # not the plain layout our writers make: webdataset's own reader decides
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


def verify(location: str | Path) -> tuple[list[str], list[str]]:
    """Check every shard of a dataset against its manifest: (report lines, names of damaged shards)."""
    location = str(location)
    manifest = load_manifest(location)
    lines, damaged = [], []
    for split, entries in manifest.splits.items():
        for entry in entries:
            try:
                read_shard(location, manifest, entry, trust_cache=False)
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
