"""Corpus preparation as a Ray job: the same dataset, byte for byte, from one process or from N workers and K tasks.

    rwkv-dist data shards --tokenizer tok/ --input 'corpus/*.jsonl' --out data/ --ray [--address auto] [--tasks K]

1. plan (driver): the sorted inputs are laid end to end and cut into K parts of about equal bytes; a cut inside a plain
   JSONL file moves to the next line start (a byte range), a cut inside any other file (one document, or a .gz that
   cannot be entered in the middle) moves to its end. Parts are contiguous, so their documents in part order are the
   corpus in input order.
2. tokenize (Ray tasks): each part's documents are read, split train/val by content hash, tokenized, and written next
   to the output as one raw id stream per split plus a document table (split, token count, normalized-text hash);
   then a part record lists the sha256 of each file. With --dedup, a copy of a text seen earlier in the same part is
   not tokenized (it cannot be the first copy in the corpus).
3. layout (driver): the tables in part order give each kept document its key (its index among kept documents, as the
   single-process writer numbers them) and each shard its documents, by the single-process rule: a shard closes
   after the document that brings it to --shard-tokens. With --dedup the first copy of every normalized text in input
   order is kept. Why a second pass over the ids rather than tasks writing final shards as they tokenize: where a
   shard ends depends on the token count of everything before it, which a task cannot know while earlier parts are
   still being tokenized; rewriting ids is a small fraction of the cost of tokenizing them.
4. write (Ray tasks): contiguous runs of shards are written straight into the output folder from the part streams and
   recorded (sha256) in a write record.
5. commit (driver): stray files of an earlier attempt are removed, the tokenizer copied, then manifest.json appears by
   an atomic rename: only now is the folder a dataset. The staging folder is removed.

Resume: a part or write task whose record exists and whose files match the sha256 in it is kept, anything else is
redone; a part's identity is a hash of its byte ranges, the inputs' size and mtime, the tokenizer and the options, so a
changed input redoes only the parts that read it. An existing dataset (a manifest in --out) is never touched.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError, RWKVDistError
from .corpus import (CorpusStats, Piece, check_readable, dedup_key, file_identity, line_start_at_or_after, read_piece,
                     splittable)
from .shards import (MANIFEST, SHARD_FILE, SPLITS, Manifest, ShardEntry, check_corpus_result, check_out,
                     check_prep_args, is_val, make_manifest, manifest_stats, shard_name, token_dtype)
from .tokenizer import MODEL_FILE, Tokenizer

PREP_FORMAT = "rwkv_dist.prep/1"  # part of every task identity: a change in what tasks write invalidates old records
DOC_TABLE = np.dtype([("split", "u1"), ("length", "<u8"), ("key", "V16")])
SPLIT_CODE = {"train": 0, "val": 1}
LOCAL_DUPLICATE = 2  # split code of a document whose normalized text appeared earlier in its own part (not tokenized)
BYTES_PER_DEFAULT_TASK = 256 << 20


# ---- plan --------------------------------------------------------------------------------------------------------

def plan_parts(files: list[Path], tasks: int) -> list[list[Piece]]:
    """The inputs cut into at most `tasks` contiguous parts of about equal bytes (see the module docstring)."""
    if tasks < 1:
        raise DataError(f"shards: --tasks must be at least 1, got {tasks}")
    sizes = [os.stat(f).st_size for f in files]
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    total = starts[-1]
    cuts = set()
    for j in range(1, tasks):
        x = j * total // tasks
        i = bisect.bisect_right(starts, x) - 1  # the file holding byte x
        if i >= len(files) or sizes[i] == 0:
            continue
        inside = x - starts[i]
        cut = starts[i] + (line_start_at_or_after(files[i], inside) if splittable(files[i]) else sizes[i])
        if 0 < cut < total:
            cuts.add(cut)
    bounds = [0, *sorted(cuts), max(total, 1)]
    parts: list[list[Piece]] = [[] for _ in bounds[:-1]]
    for f, c, s in zip(files, starts, sizes):
        k = min(bisect.bisect_right(bounds, c) - 1, len(parts) - 1)
        if s == 0:
            parts[k].append(Piece(str(f)))
            continue
        while k < len(parts) and bounds[k] < c + s:
            lo, hi = max(bounds[k], c), min(bounds[k + 1], c + s)
            if lo < hi:
                parts[k].append(Piece(str(f), lo - c, None if hi == c + s else hi - c))
            k += 1
    return [p for p in parts if p]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write under a unique temporary name and rename: readers see the whole file or none (two attempts at the same
    task, e.g. a retried one, write the same bytes)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load_record(path: Path, folder: Path) -> dict | None:
    """A finished task's record, if it exists and every file it lists still has the sha256 it recorded."""
    try:
        record = json.loads(path.read_text())
        for name, digest in record["files"].items():
            if _sha256(folder / name) != digest:
                return None
        return record
    except (OSError, ValueError, KeyError):
        return None


# ---- tokenize (one Ray task per part) -----------------------------------------------------------------------------

def tokenize_part(index: int, part_id: str, pieces: list[Piece], staging: str, model: bytes, text_field: str,
                  val_fraction: float, dedup: bool, on_bad: str, board=None, batch_docs: int = 256) -> dict:
    """Tokenize one part into staging/parts/{part_id}.{train,val}.bin + .docs.npy; return (and save) its record."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model)
    little = np.dtype(token_dtype(sp.vocab_size())).newbyteorder("<")
    folder = Path(staging) / "parts"
    stats = CorpusStats()
    rows: list[list] = []  # [split, length, key] per document, in order
    seen: set[bytes] = set()
    tag = uuid.uuid4().hex[:8]
    names = {s: f"{part_id}.{s}.bin" for s in SPLITS}
    tmp = {s: folder / f".{names[s]}.{tag}.tmp" for s in SPLITS}
    outs = {s: open(tmp[s], "wb") for s in SPLITS}
    tokens = {s: 0 for s in SPLITS}
    batch: list[tuple[str, int]] = []  # (text, row index)
    done_bytes, last_report = 0, time.monotonic()

    def flush() -> None:
        for (text, row), ids in zip(batch, sp.encode([t for t, _ in batch], num_threads=1)):
            split = SPLITS[rows[row][0]]
            outs[split].write(np.asarray(ids, dtype=little).tobytes())
            rows[row][1] = len(ids)
            tokens[split] += len(ids)
        batch.clear()

    def report(now_bytes: int) -> None:
        if board is not None:
            board.report(str(index), stats.documents, sum(tokens.values()), now_bytes)

    try:
        for piece in pieces:
            size = (piece.end if piece.end is not None else os.stat(piece.path).st_size) - piece.start
            chars_before = stats.characters
            for text in read_piece(piece, text_field, stats, on_bad):
                key = dedup_key(text) if dedup else bytes(16)
                if dedup and key in seen:
                    rows.append([LOCAL_DUPLICATE, 0, key])
                    continue
                if dedup:
                    seen.add(key)
                rows.append([SPLIT_CODE["val" if is_val(text, val_fraction) else "train"], 0, key])
                batch.append((text, len(rows) - 1))
                if len(batch) == batch_docs:
                    flush()
                    if time.monotonic() - last_report > 1:  # characters read stand in for bytes inside a piece
                        report(done_bytes + min(size, stats.characters - chars_before))
                        last_report = time.monotonic()
            done_bytes += size
        flush()
    finally:
        for f in outs.values():
            f.close()
    table = np.array([tuple(r) for r in rows], dtype=DOC_TABLE)
    table_name = f"{part_id}.docs.npy"
    with open(folder / f".{table_name}.{tag}.tmp", "wb") as f:
        np.save(f, table, allow_pickle=False)
    os.replace(folder / f".{table_name}.{tag}.tmp", folder / table_name)
    for s in SPLITS:
        os.replace(tmp[s], folder / names[s])
    record = {"index": index, "id": part_id, "pieces": [[p.path, p.start, p.end] for p in pieces],
              "stats": stats.counts(), "tokens": tokens, "documents": len(rows),
              "files": {n: _sha256(folder / n) for n in (*names.values(), table_name)}}
    _write_atomic(folder / f"{part_id}.json", json.dumps(record).encode())  # last: the part is finished
    report(done_bytes)
    return record


# ---- layout (driver) ----------------------------------------------------------------------------------------------

@dataclass
class ShardPlan:
    name: str
    split: str
    rows: np.ndarray  # per document: part index, offset and length in that part's split stream, key


ROW = np.dtype([("part", "<u4"), ("offset", "<u8"), ("length", "<u8"), ("key", "<u8")])


def layout_shards(tables: list[np.ndarray], shard_tokens: int, dedup: bool) -> tuple[list[ShardPlan], int, int]:
    """Every shard's documents, keys and places in the part streams, as the single-process writer would cut them;
    also (duplicates dropped, tokens kept)."""
    table = np.concatenate(tables) if tables else np.zeros(0, DOC_TABLE)
    part = np.repeat(np.arange(len(tables), dtype=np.uint32), [len(t) for t in tables])
    split, length = table["split"], table["length"].astype(np.int64)
    kept = split != LOCAL_DUPLICATE
    if dedup and len(table):
        _, first = np.unique(table["key"], return_index=True)  # index of the first occurrence of each text
        kept = np.zeros(len(table), bool)
        kept[first] = True
    keys = np.cumsum(kept) - 1  # a kept document's index among kept documents, in input order
    shards: list[ShardPlan] = []
    for name, code in SPLIT_CODE.items():
        in_split = split == code
        # offset of each document in its part's stream of this split: ids of all earlier documents of that part and
        # split, duplicates dropped later included (they were tokenized and written)
        ids = np.where(in_split, length, 0)
        before = np.cumsum(ids) - ids  # over the whole corpus; minus its value at each part's first document
        first_row = np.searchsorted(part, np.arange(len(tables)))
        offset = before - np.append(before, 0)[first_row][part]
        docs = np.nonzero(kept & in_split)[0]
        csum = np.cumsum(length[docs])
        start = number = 0
        while start < len(docs):
            base = csum[start - 1] if start else 0
            end = min(int(np.searchsorted(csum, base + shard_tokens, side="left")) + 1, len(docs))
            chosen = docs[start:end]
            rows = np.zeros(len(chosen), ROW)
            rows["part"], rows["offset"], rows["length"], rows["key"] = (part[chosen], offset[chosen],
                                                                         length[chosen], keys[chosen])
            shards.append(ShardPlan(shard_name(name, number), name, rows))
            start, number = end, number + 1
    duplicates = int(np.count_nonzero(~kept))
    return shards, duplicates, int(length[kept].sum())


# ---- write (one Ray task per run of shards) ----------------------------------------------------------------------

def write_group(index: int, group_id: str, shards: list[ShardPlan], part_ids: list[str], staging: str, out: str,
                dtype: str, board=None) -> dict:
    """Write a run of final shards into `out` from the part streams; return (and save) the write record."""
    from .shards import ShardTar

    little = np.dtype(dtype).newbyteorder("<")
    streams: dict[tuple[int, str], np.ndarray] = {}
    entries = []
    for shard in shards:
        tmp = Path(out) / f".{shard.name}.{uuid.uuid4().hex[:8]}.tmp"
        tar = ShardTar(tmp, dtype)
        for p, offset, length, key in shard.rows.tolist():
            if (p, shard.split) not in streams:
                streams[(p, shard.split)] = np.memmap(Path(staging) / "parts" / f"{part_ids[p]}.{shard.split}.bin",
                                                      dtype=little, mode="r")
            tar.add(f"{key:012d}", streams[(p, shard.split)][offset:offset + length])
        entry = tar.close(shard.name)
        os.replace(tmp, Path(out) / shard.name)
        entries.append(entry.model_dump())
        if board is not None:
            board.report(str(index), sum(e["samples"] for e in entries), sum(e["tokens"] for e in entries), 0)
    record = {"index": index, "id": group_id, "entries": entries, "files": {e["file"]: e["sha256"] for e in entries}}
    _write_atomic(Path(staging) / "writes" / f"{group_id}.json", json.dumps(record).encode())
    return record


def group_shards(shards: list[ShardPlan], groups: int, part_ids: list[str], dtype: str) -> list[tuple[str, list]]:
    """Contiguous runs of shards, each with an identity: a hash of what it writes (names, sources, keys)."""
    runs = [list(r) for r in np.array_split(np.arange(len(shards)), max(1, min(groups, len(shards)))) if len(r)]
    out = []
    for run in runs:
        h = hashlib.sha256(f"{PREP_FORMAT} {dtype}".encode())
        for i in run:
            s = shards[i]
            h.update(s.name.encode())
            h.update(" ".join(part_ids[p] for p in np.unique(s.rows["part"])).encode())
            h.update(s.rows.tobytes())
        out.append((h.hexdigest()[:32], [shards[i] for i in run]))
    return out


# ---- driver -------------------------------------------------------------------------------------------------------

class ProgressFiles:
    """Where running tasks leave their counts (documents, tokens, bytes read) for the driver's progress line: a small
    file per task next to its outputs, rewritten about once a second. Files, not a Ray actor: an actor is one more
    process to start per prep, and the staging folder is shared by every task anyway."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def report(self, key: str, docs: int, tokens: int, nbytes: int) -> None:
        _write_atomic(self.folder / f"{key}.progress", json.dumps([docs, tokens, nbytes]).encode())

    def read(self, key: str) -> tuple[int, int, int]:
        try:
            return tuple(json.loads((self.folder / f"{key}.progress").read_text()))
        except (OSError, ValueError):
            return (0, 0, 0)


class Progress:
    """One line per phase: tasks done, documents, tokens, tokens/s, ETA (from bytes read). Rewritten in place on a
    terminal; printed every `every` seconds otherwise (cluster logs)."""

    def __init__(self, phase: str, total_tasks: int, kept: int, total_bytes: int, kept_bytes: int,
                 echo: Callable[[str], None] | None, every: float = 10.0):
        self.phase, self.total, self.kept, self.done = phase, total_tasks, kept, kept
        self.total_bytes, self.kept_bytes, self.echo, self.every = total_bytes, kept_bytes, echo, every
        self.start = self.last = time.monotonic()
        self.docs = self.tokens = self.bytes = 0
        self.tty = echo is print and sys.stdout.isatty()

    def update(self, counts: list[tuple[int, int, int]]) -> None:
        self.docs, self.tokens, self.bytes = (sum(c[i] for c in counts) for i in range(3))

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.tokens / elapsed
        text = (f"{self.phase:8s} {self.done}/{self.total} tasks ({self.kept} kept from before)  {self.docs:,} docs  "
                f"{self.tokens:,} tokens  {rate:,.0f} tokens/s")
        if self.total_bytes:  # the bytes still to read at this run's reading speed
            left = max(self.total_bytes - self.kept_bytes - self.bytes, 0)
            speed = self.bytes / elapsed
            if speed or not left:
                seconds = round(left / speed) if left else 0
                text += f"  ETA {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
            else:
                text += "  ETA ?"
        return text

    def tick(self, final: bool = False) -> None:
        if self.echo is None:
            return
        now = time.monotonic()
        if self.tty and not final:
            if now - self.last > 0.5:
                print("\r" + self.line(), end="", flush=True)
                self.last = now
        elif final or now - self.last > self.every:
            if self.tty:
                print("\r", end="")
            self.echo(self.line())
            self.last = now


def _ray_get(ref):
    """ray.get, with an error of ours raised in a task turned back into that one-line error."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, RWKVDistError):
            raise type(e.cause)(str(e.cause)) from None
        raise


def run_tasks(fn, calls: list[tuple], workers: int, progress: Progress, board: ProgressFiles) -> list:
    """fn(*call, board) for every call as Ray tasks, at most `workers` at once, in order of submission; results in
    order. A task's first argument is its progress key. The first failure stops submitting (the tasks in flight end,
    and finished tasks keep their records for a rerun)."""
    import ray

    remote = ray.remote(num_cpus=1)(fn)
    results: list = [None] * len(calls)
    pending: dict = {}
    submitted = 0
    finished: dict[int, tuple] = {}  # progress counts of finished tasks, read once

    def counts() -> list[tuple]:
        for i in range(submitted):
            if i not in finished and results[i] is not None:
                finished[i] = board.read(str(calls[i][0]))
        return list(finished.values()) + [board.read(str(calls[i][0])) for i in pending.values()]

    try:
        while submitted < len(calls) or pending:
            while submitted < len(calls) and len(pending) < workers:
                pending[remote.remote(*calls[submitted], board)] = submitted
                submitted += 1
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                results[pending.pop(ref)] = _ray_get(ref)
                progress.done += 1
            progress.update(counts())
            progress.tick()
    finally:
        # the tasks in flight (at most `workers`) run to their end rather than being cancelled: ray.cancel racing a
        # task's completion trips a RAY_CHECK in this Ray ("Tried to complete task that was not pending") that kills
        # the driver; what they finish is kept for a rerun like any finished task
        if pending:
            ray.wait(list(pending), num_returns=len(pending))
    progress.update(counts())
    progress.tick(final=True)
    return results


@contextmanager
def ray_session(address: str | None, workers: int | None):
    """The Ray to run on: the one this process already joined (tests, notebooks), else a private local instance
    (`local`, stopped at the end, as `rwkv-dist launch` does) or a cluster (`auto`, `ray://HOST:PORT`)."""
    import ray

    if ray.is_initialized():
        yield
        return
    if not (address in ("local", "auto") or re.fullmatch(r"(ray://)?[\w.-]+:\d+", address or "")):
        raise DataError(f"--address must be local, auto, HOST:PORT (a head's GCS) or ray://HOST:PORT, got {address!r}")
    import logging

    env = {"env_vars": {k: os.environ[k] for k in ("TMPDIR",) if k in os.environ}}
    # Ray's start-up notices (instance started, cluster joined, token authentication on) are not news here, and a
    # bad-input error must stay the one line on stderr
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if address == "local":
        ray.init(num_cpus=workers or 2, include_dashboard=False, runtime_env=env, logging_level=logging.WARNING)
    else:
        ray.init(address=address, runtime_env=env, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def _cluster_workers(workers: int | None) -> int:
    import ray

    return workers or max(1, int(ray.cluster_resources().get("CPU", 1)))


def default_tasks(workers: int, total_bytes: int) -> int:
    """Enough tasks to balance `workers` (4 each) and to keep a task near 256 MiB of input on large corpora. Fixed by
    the command, not the cluster's size, so the same command resumes the same tasks."""
    return max(4 * workers, math.ceil(total_bytes / BYTES_PER_DEFAULT_TASK))


def _task_count(staging: Path, tasks: int | None, workers: int, total_bytes: int) -> int:
    """--tasks, else the count an interrupted run of this prep chose (kept in the staging folder: a cluster that
    grew or shrank in between must not re-cut the inputs and redo every part), else default_tasks."""
    saved = staging / "tasks.json"
    if tasks is None:
        try:
            tasks = int(json.loads(saved.read_text())["tasks"])
        except (OSError, ValueError, KeyError):
            tasks = default_tasks(workers, total_bytes)
    _write_atomic(saved, json.dumps({"tasks": tasks}).encode())
    return tasks


@dataclass
class PrepResult:
    manifest: Manifest
    stats: CorpusStats
    parts: int
    parts_kept: int
    writes: int
    writes_kept: int
    tokens_done: int  # tokenized by this run (parts kept from an earlier run excluded)
    seconds: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_done / max(self.seconds.get("tokenize", 0), 1e-9)


def prepare_shards(files: list[Path], tokenizer: Tokenizer, out: str | Path, shard_tokens: int = 10_000_000,
                   val_fraction: float = 0.0, text_field: str = "text", dedup: bool = False, on_bad: str = "stop",
                   workers: int | None = None, tasks: int | None = None, address: str | None = "local",
                   echo: Callable[[str], None] | None = print) -> PrepResult:
    """`rwkv-dist data shards --ray`: the dataset write_shards makes from the same documents, written by Ray tasks."""
    check_prep_args(shard_tokens, val_fraction)
    if workers is not None and workers < 1:
        raise DataError(f"shards: --workers must be at least 1, got {workers}")
    if "://" in str(out) or str(out).startswith("pipe:"):
        raise DataError(f"{out}: --ray writes to a folder (local, or shared by the nodes); prepare there and upload "
                        f"the finished folder to object storage")
    out = Path(out).resolve()
    check_out(out)
    files = [Path(os.path.abspath(f)) for f in files]  # tasks run elsewhere, in other working directories
    if on_bad == "stop":
        check_readable(files)  # before Ray starts: an unreadable input is found in seconds, not after hours
    staging = out.parent / f".{out.name}.prep"
    for sub in ("parts", "writes"):
        (staging / sub).mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    options = {"format": PREP_FORMAT, "tokenizer": tokenizer.sha256, "text_field": text_field,
               "val_fraction": val_fraction, "dedup": dedup, "on_bad": on_bad}
    with ray_session(address, workers):
        import ray

        workers = _cluster_workers(workers)
        total_bytes = sum(os.stat(f).st_size for f in files)
        parts = plan_parts(files, _task_count(staging, tasks, workers, total_bytes))
        identity = {str(f): file_identity(f) for f in files}
        part_ids = [_digest({"pieces": [[p.path, p.start, p.end, *identity[p.path]] for p in pieces], **options})
                    for pieces in parts]
        part_bytes = [sum((p.end if p.end is not None else identity[p.path][0]) - p.start for p in pieces)
                      for pieces in parts]
        records: list[dict | None] = [_load_record(staging / "parts" / f"{pid}.json", staging / "parts")
                                      for pid in part_ids]
        todo = [i for i, r in enumerate(records) if r is None]
        model = ray.put(tokenizer.path.read_bytes())
        board = ProgressFiles(staging / "parts")
        progress = Progress("tokenize", len(parts), len(parts) - len(todo), total_bytes,
                            total_bytes - sum(part_bytes[i] for i in todo), echo)
        t0 = time.monotonic()
        try:
            done = run_tasks(tokenize_part, [(i, part_ids[i], parts[i], str(staging), model, text_field,
                                              val_fraction, dedup, on_bad) for i in todo], workers, progress, board)
        except DataError as e:  # bad input under on_bad=stop: finished parts stay for the rerun after the fix
            kept = sum((staging / "parts" / f"{pid}.json").exists() for pid in part_ids)
            if not kept:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            raise DataError(f"{e} ({kept} finished tasks kept in {staging} for a rerun)") from None
        seconds = {"tokenize": time.monotonic() - t0}
        tokens_done = sum(sum(r["tokens"].values()) for r in done)
        for i, r in zip(todo, done):
            records[i] = r

        stats = CorpusStats()
        for r in records:
            stats.add(CorpusStats.from_counts(r["stats"]))
        tables = [np.load(staging / "parts" / f"{pid}.docs.npy", allow_pickle=False) for pid in part_ids]
        shards, stats.duplicates, total_tokens = layout_shards(tables, shard_tokens, dedup)
        try:
            check_corpus_result(stats.documents, sum(s.split == "train" for s in shards), val_fraction, stats)
        except DataError:
            shutil.rmtree(staging, ignore_errors=True)  # nothing worth keeping: the corpus itself is unusable
            raise

        out.mkdir(parents=True, exist_ok=True)
        groups = group_shards(shards, len(parts), part_ids, dtype)
        written: list[dict | None] = [_load_record(staging / "writes" / f"{gid}.json", out) for gid, _ in groups]
        todo_w = [i for i, r in enumerate(written) if r is None]
        board = ProgressFiles(staging / "writes")
        progress = Progress("write", len(groups), len(groups) - len(todo_w), 0, 0, echo)
        t0 = time.monotonic()
        for i, r in zip(todo_w, run_tasks(write_group, [(i, groups[i][0], groups[i][1], part_ids, str(staging),
                                                        str(out), dtype) for i in todo_w], workers, progress, board)):
            written[i] = r
        seconds["write"] = time.monotonic() - t0

    entries = [ShardEntry(**e) for r in written for e in r["entries"]]
    splits = {s: [e for e in entries if e.file.startswith(f"{s}-")] for s in SPLITS}
    manifest = make_manifest(tokenizer, shard_tokens, val_fraction, splits,
                             manifest_stats(stats, total_tokens, dedup))
    commit(out, manifest, tokenizer)
    shutil.rmtree(staging, ignore_errors=True)
    return PrepResult(manifest, stats, len(parts), len(parts) - len(todo), len(groups), len(groups) - len(todo_w),
                      tokens_done, seconds)


def commit(out: Path, manifest: Manifest, tokenizer: Tokenizer) -> None:
    """Make `out` the dataset `manifest` describes: stray files of an earlier attempt removed, the tokenizer copied,
    and the manifest written last, by an atomic rename."""
    keep = {e.file for entries in manifest.splits.values() for e in entries}
    for p in out.iterdir():
        if (SHARD_FILE.match(p.name) and p.name not in keep) or p.name.endswith(".tmp"):
            p.unlink()
    _write_atomic(out / MODEL_FILE, tokenizer.path.read_bytes())
    _write_atomic(out / MANIFEST, (manifest.model_dump_json(indent=2) + "\n").encode())


# ---- tokenizer sample -------------------------------------------------------------------------------------------

def _sample_hash(seed: int, text: str) -> int:
    """A document's draw: uniform in [0, 2^64), fixed by (seed, text), whatever task reads it."""
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode())
    return int.from_bytes(h.digest(), "big")


def _take(candidates: list[tuple], budget: int) -> list[tuple]:
    """(draw, part, position, text) in ascending draw order until `budget` characters are reached (the document that
    reaches it included). A task applies the same cut to its own candidates first: a document it drops has at least
    `budget` characters of lower draws in that task alone, so the global cut would drop it too."""
    chosen, chars = [], 0
    for c in sorted(candidates):
        if chars >= budget:
            break
        chosen.append(c)
        chars += len(c[3])
    return chosen


def sample_part(index: int, pieces: list[Piece], seed: int, threshold: int, budget: int, text_field: str,
                on_bad: str, board=None) -> dict:
    """One part's candidates for the tokenizer sample: documents whose draw is below `threshold`, cut at `budget`."""
    stats = CorpusStats()
    candidates, last = [], time.monotonic()
    position = 0
    for piece in pieces:
        for text in read_piece(piece, text_field, stats, on_bad):
            draw = _sample_hash(seed, text)
            if draw < threshold:
                candidates.append((draw, index, position, text))
            position += 1
            if board is not None and time.monotonic() - last > 1:
                board.report(str(index), stats.documents, 0, stats.characters)
                last = time.monotonic()
    if board is not None:
        board.report(str(index), stats.documents, 0, stats.characters)
    return {"stats": stats.counts(), "candidates": _take(candidates, budget)}


def sample_documents(files: list[Path], budget_chars: int, seed: int = 0, text_field: str = "text",
                     on_bad: str = "stop", use_ray: bool = False, workers: int | None = None,
                     tasks: int | None = None, address: str | None = "local", scratch: str | Path | None = None,
                     echo: Callable[[str], None] | None = print) -> tuple[list[str], CorpusStats]:
    """A uniform sample of documents over all inputs, about `budget_chars` characters, in input order: each document
    draws a number from (seed, its text) and the lowest draws are taken (corpora smaller than the budget are taken
    whole). The sample depends on the corpus, the seed and the budget only: not on workers, tasks or Ray. Documents
    with a draw above 3x the budget's share of the bytes are dropped while reading, so a task returns a few times its
    share of the sample, not its part. `scratch`: a folder every node sees, for the progress line (the output's).
    """
    if budget_chars < 1:
        raise DataError(f"tokenizer: --sample-chars must be positive, got {budget_chars}")
    files = [Path(os.path.abspath(f)) for f in files]
    total_bytes = sum(os.stat(f).st_size for f in files)
    threshold = 2**64 if 3 * budget_chars >= total_bytes else (2**64 * 3 * budget_chars) // total_bytes
    if not use_ray:
        result = sample_part(0, [Piece(str(f)) for f in files], seed, threshold, budget_chars, text_field, on_bad)
        results = [result]
    else:
        with ray_session(address, workers):
            workers = _cluster_workers(workers)
            parts = plan_parts(files, tasks or default_tasks(workers, total_bytes))
            board = ProgressFiles(Path(tempfile.mkdtemp(prefix=".sample-progress-", dir=scratch)))
            progress = Progress("sample", len(parts), 0, total_bytes, 0, echo)
            try:
                results = run_tasks(sample_part, [(i, pieces, seed, threshold, budget_chars, text_field, on_bad)
                                                  for i, pieces in enumerate(parts)], workers, progress, board)
            finally:
                shutil.rmtree(board.folder, ignore_errors=True)
    stats = CorpusStats()
    for r in results:
        stats.add(CorpusStats.from_counts(r["stats"]))
    chosen = _take([c for r in results for c in r["candidates"]], budget_chars)
    return [c[3] for c in sorted(chosen, key=lambda c: (c[1], c[2]))], stats


def train_tokenizer_task(texts: list[str], vocab_size: int, model_type: str, input_sentence_size: int, seed: int,
                         board=None) -> bytes:
    """sentencepiece training as a Ray task (on a cluster node, not the machine the command was typed on)."""
    from .tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        return train_tokenizer(texts, folder, vocab_size, model_type, input_sentence_size, seed=seed).read_bytes()


def train_tokenizer_on_ray(texts: list[str], out_dir: str | Path, vocab_size: int, model_type: str = "bpe",
                           input_sentence_size: int = 2_000_000, seed: int = 0, address: str | None = "local") -> Path:
    import ray

    with ray_session(address, None):
        model = _ray_get(ray.remote(num_cpus=1)(train_tokenizer_task).remote(
            ray.put(texts), vocab_size, model_type, input_sentence_size, seed))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / MODEL_FILE, model)
    return out_dir / MODEL_FILE
