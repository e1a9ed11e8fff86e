"""The streaming, resumable token loader: shards -> documents -> packed (input, target) windows -> batches.

Who reads what. A *consumer* is one (rank, DataLoader worker) pair; there are world_size x num_workers of them, numbered
rank * num_workers + worker. In epoch e the shards of a source are shuffled by (seed, e, source key: its name, else its
manifest's identity, so a moved copy reads in the same order) and dealt round-robin to the consumers; each consumer reads its shards whole (so the manifest's sha256 is checked before any sample is used),
shuffles their documents by (seed, e, shard), and concatenates them, each followed by the end-of-document token, into
one token stream. Windows of ctx_len + 1 tokens are cut from that stream with a stride of ctx_len: window k is
stream[k ctx_len : (k+1) ctx_len + 1], input = window[:-1], target = window[1:], so every token is a target exactly once.
With several sources, each window is drawn from one source picked with the configured weights by (seed, consumer, k).

Position. A consumer's position in a source is (epoch, its work list, item, document, token): the first token of its
next window. The loader's state_dict() holds every consumer's position and which worker delivers the next batch, so a
restored loader yields exactly the batches an uninterrupted one would have.

Changing the number of consumers (world size or workers) between save and restore. Guarantee: within every epoch that
was in progress, each token of the corpus is still a target exactly once: no document is repeated or skipped. The
unread remainder of each old consumer's epoch (the rest of its current document and shard, and its unread shards; for
consumers that had not reached a later epoch that some other consumer had started, their whole share of it) is split
round-robin over the new consumers, by (shard, document, token) order; later epochs use the new layout. What changes is
only which consumer reads which remainder, hence the order and the batch composition after the resume.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import numpy.random  # noqa: F401 - numpy imports it on first use, which would land in the first batch
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import DataError
from .shards import Manifest, ShardDamaged, check_same_tokenizer, load_manifest, read_shard

STATE_VERSION = 1


@dataclass(frozen=True)
class Source:
    """One dataset (a directory or URL with a manifest) and its weight in the mixture. Its `key` (which seeds its
    shuffle order and names it in the loader's state) is `name` when given, else the dataset's identity (its
    manifest's content hash), never its location: a dataset copied elsewhere continues a run exactly."""

    location: str
    weight: float = 1.0
    name: str = ""
    identity: str = ""  # filled in by the loader from the manifest

    @property
    def key(self) -> str:
        return self.name or f"dataset:{self.identity[:16]}"


def _seed_words(*parts) -> list[int]:
    """Stable numpy seed words from strings and ints (Python's hash() is salted per process)."""
    words = []
    for p in parts:
        if isinstance(p, str):
            words.append(int.from_bytes(hashlib.blake2b(p.encode(), digest_size=4).digest(), "big"))
        else:
            words.append(int(p))
    return words


class SourceCursor:
    """One consumer's position in one source, and the tokens at it."""

    def __init__(self, source: Source, manifest: Manifest, split: str, consumer: int, consumers: int, seed: int,
                 on_error: str, state: dict | None = None):
        self.source, self.manifest, self.split = source, manifest, split
        self.entries = manifest.shards(split)
        self.consumer, self.consumers, self.seed, self.on_error = consumer, consumers, seed, on_error
        self.skipped_shards = 0
        if state is None:
            state = {"epoch": 0, "work": None, "item": 0, "doc": 0, "tok": 0, "pending": []}
        self.epoch, self.item, self.doc, self.tok = state["epoch"], state["item"], state["doc"], state["tok"]
        self.pending = [dict(p) for p in state["pending"]]
        self.work = self._standard_work(self.epoch) if state["work"] is None else [tuple(w) for w in state["work"]]
        self.custom_work = state["work"] is not None
        # The shard of work[item], once loaded: where each of its documents, shuffled, starts in its token stream
        # (each document followed by the end-of-document token; the last entry is the stream's length); its documents
        # (views into the shard's bytes) until the stream is built from them on first use; the stream; its eod.
        self._starts: list[int] | None = None
        self._docs: list[np.ndarray] | None = None
        self._stream: np.ndarray | None = None
        self._stream_eod: int | None = None

    # -- layout ---------------------------------------------------------------------------------------------------
    def shard_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(_seed_words(self.seed, epoch, self.source.key, self.split))
        return rng.permutation(len(self.entries))

    def _standard_work(self, epoch: int, consumer: int | None = None, consumers: int | None = None) -> list[tuple]:
        consumer = self.consumer if consumer is None else consumer
        consumers = self.consumers if consumers is None else consumers
        return [(int(s), 0, 0) for s in self.shard_order(epoch)[consumer::consumers]]

    def state(self) -> dict:
        return {"epoch": self.epoch, "work": [list(w) for w in self.work] if self.custom_work else None,
                "item": self.item, "doc": self.doc, "tok": self.tok, "pending": self.pending}

    def position(self) -> tuple[int, int, int, int]:
        """(epoch, shard, document, token) of the next token, after any pending move to the next shard or epoch."""
        self._load()
        return self.epoch, self.work[self.item][0], self.doc, self.tok

    # -- reading --------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        """Make work[item] readable, skipping damaged shards (or failing) and rolling over to the next epoch."""
        empty_rounds = 0
        while self._starts is None:
            if self.item >= len(self.work):
                self._next_epoch()
                empty_rounds += 1
                if empty_rounds > 2:
                    raise DataError(f"{self.source.location}: no readable {self.split} shard for consumer {self.consumer}")
                continue
            shard = self.work[self.item][0]
            entry = self.entries[shard]
            try:
                docs = read_shard(self.source.location, self.manifest, entry)
            except ShardDamaged as e:
                if self.on_error == "fail":
                    raise DataError(f"damaged shard: {e}") from None
                warnings.warn(f"skipping damaged shard: {e}", stacklevel=2)
                self.skipped_shards += 1
                self._next_item()
                continue
            order = np.random.default_rng(_seed_words(self.seed, self.epoch, self.source.key, entry.file)).permutation(len(docs))
            self._docs = [docs[i] for i in order]
            self._starts = [0, *itertools.accumulate(len(d) + 1 for d in self._docs)]
            if self.doc >= len(docs):  # nothing left of this shard (a position saved at its very end)
                self._next_item()
            empty_rounds = 0

    def _next_item(self) -> None:
        self._docs = self._starts = self._stream = None
        self.item += 1
        if self.item < len(self.work):
            _, self.doc, self.tok = self.work[self.item]

    def _next_epoch(self) -> None:
        if self.pending:
            nxt = self.pending.pop(0)
            self.epoch, self.work, self.custom_work = nxt["epoch"], [tuple(w) for w in nxt["work"]], True
        else:
            self.epoch += 1
            self.work, self.custom_work = self._standard_work(self.epoch), False
        self.item = 0
        self.doc, self.tok = (self.work[0][1], self.work[0][2]) if self.work else (0, 0)

    def _token_stream(self, eod: int) -> np.ndarray:
        """The loaded shard's documents, each followed by eod, as one array (one vectorized copy per shard)."""
        if self._stream is None:
            self._stream, self._stream_eod, self._docs = token_stream(self._docs, eod), eod, None
        elif self._stream_eod != eod:
            self._stream[np.array(self._starts[1:]) - 1] = eod
            self._stream_eod = eod
        return self._stream

    def take(self, n: int, eod: int, out: np.ndarray | None = None) -> np.ndarray:
        """The next n tokens (into `out` when given); the position moves n - 1 tokens on (the last token also starts
        the next window)."""
        out = np.empty(n, dtype=np.int64) if out is None else out
        filled = 0
        while filled < n - 1:
            self._load()
            stream = self._token_stream(eod)
            at = self._starts[self.doc] + self.tok
            m = min(len(stream) - at, n - 1 - filled)
            out[filled : filled + m] = stream[at : at + m]
            filled += m
            if at + m == len(stream):  # past the shard's last end-of-document token
                self._next_item()
            else:
                self.doc = bisect.bisect_right(self._starts, at + m) - 1
                self.tok = at + m - self._starts[self.doc]
        self._load()
        out[n - 1] = self._token_stream(eod)[self._starts[self.doc] + self.tok]  # peek
        return out


def token_stream(docs: list[np.ndarray], eod: int) -> np.ndarray:
    """The documents, each followed by the end-of-document token, as one array (one copy)."""
    if not docs:
        return np.empty(0, dtype=np.int64)
    pieces = [np.array([eod], dtype=docs[0].dtype)] * (2 * len(docs))
    pieces[::2] = docs
    return np.concatenate(pieces)


class _ConsumerStream:
    """All sources of one consumer, mixed by weight, cut into batches."""

    def __init__(self, sources: list[Source], manifests: list[Manifest], split: str, consumer: int, consumers: int,
                 seed: int, on_error: str, ctx_len: int, batch_size: int, state: dict | None):
        state = state or {"windows": 0, "sources": {}}
        self.consumer, self.seed, self.ctx_len, self.batch_size = consumer, seed, ctx_len, batch_size
        self.windows = state["windows"]
        self.cursors = [SourceCursor(s, m, split, consumer, consumers, seed, on_error, state["sources"].get(s.key))
                        for s, m in zip(sources, manifests)]
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.cumulative = np.cumsum(weights / weights.sum())
        self.eod = manifests[0].tokenizer.eod_id

    def state(self) -> dict:
        return {"windows": self.windows, "sources": {c.source.key: c.state() for c in self.cursors}}

    def skipped_shards(self) -> int:
        return sum(c.skipped_shards for c in self.cursors)

    def epochs(self) -> dict[str, int]:
        return {c.source.key: c.epoch for c in self.cursors}

    def _pick(self) -> SourceCursor:
        if len(self.cursors) == 1:
            return self.cursors[0]
        u = np.random.default_rng(_seed_words(self.seed, self.consumer, self.windows, "mix")).random()
        return self.cursors[min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.cursors) - 1)]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        windows, names = np.empty((self.batch_size, self.ctx_len + 1), dtype=np.int64), []
        for row in windows:
            cursor = self._pick()
            cursor.take(self.ctx_len + 1, self.eod, out=row)
            names.append(cursor.source.key)
            self.windows += 1
        w = torch.from_numpy(windows)
        return w[:, :-1], w[:, 1:], names


@dataclass
class Batch:
    inputs: torch.Tensor  # [B, ctx_len] int64
    targets: torch.Tensor  # [B, ctx_len] int64
    sources: list[str]  # the source of each row
    consumer: int
    epochs: dict[str, int]
    skipped_shards: int


class _Workers(IterableDataset):
    """Runs the consumers of this rank inside DataLoader workers; each batch carries its consumer's new state."""

    def __init__(self, loader: "TokenLoader"):
        self.loader = loader

    def __iter__(self):
        info = get_worker_info()
        worker = 0 if info is None else info.id
        yield from self.loader._consumer_batches(worker)


class TokenLoader:
    """Batches of packed windows for one rank; `state_dict()` / `load_state_dict()` resume it exactly.

    sources: one or more Source (weights need not sum to 1). split: "train" streams forever (epochs are counted);
    use `validation_batches` for a single pass over "val". on_error: "skip" (warn, count, go on) or "fail"."""

    def __init__(self, sources: list[Source] | Source | str, ctx_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, split: str = "train",
                 on_error: str = "skip", tokenizer_sha256: str | None = None):
        if isinstance(sources, (str, Source)):
            sources = [sources if isinstance(sources, Source) else Source(sources)]
        if not sources:
            raise DataError("loader: no data sources")
        if on_error not in ("skip", "fail"):
            raise DataError(f"loader: on_error must be 'skip' or 'fail', got {on_error!r}")
        if ctx_len < 1 or batch_size < 1:
            raise DataError(f"loader: ctx_len and batch_size must be positive, got {ctx_len}, {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"loader: rank {rank} is not in [0, {world_size})")
        for s in sources:
            if not (s.weight > 0 and math.isfinite(s.weight)):
                raise DataError(f"loader: source {s.name or s.location!r} has weight {s.weight}; weights must be positive")
        self.manifests = [load_manifest(s.location) for s in sources]
        self.sources = [replace(s, identity=m.identity) for s, m in zip(sources, self.manifests)]
        if len({s.key for s in self.sources}) != len(sources):
            raise DataError("loader: two sources have the same name, or are the same dataset without names")
        expected = tokenizer_sha256 or self.manifests[0].tokenizer.sha256
        for s, m in zip(self.sources, self.manifests):
            check_same_tokenizer(m, expected, s.location, "the run" if tokenizer_sha256 else self.sources[0].location)
        self.ctx_len, self.batch_size, self.split, self.on_error, self.seed = ctx_len, batch_size, split, on_error, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.workers = max(num_workers, 1)
        self.consumers = world_size * self.workers
        for s, m in zip(self.sources, self.manifests):
            if len(m.shards(split)) < self.consumers:
                raise DataError(f"{s.location}: {len(m.shards(split))} {split} shards for {self.consumers} consumers "
                                f"({world_size} ranks x {self.workers} workers); make smaller shards (--shard-tokens)")
        self._consumer_states: dict[int, dict | None] = {self.consumer_id(w): None for w in range(self.workers)}
        self._next_worker = 0
        self.batches = 0
        self.skipped_shards = 0
        self.epochs: dict[str, int] = {s.key: 0 for s in self.sources}

    def consumer_id(self, worker: int) -> int:
        return self.rank * self.workers + worker

    # -- iteration ------------------------------------------------------------------------------------------------
    def _consumer_batches(self, worker: int) -> Iterator[tuple]:
        # DataLoader's worker 0 delivers first; rotate so that the worker due next when the state was saved goes first
        consumer = self.consumer_id((worker + self._next_worker) % self.workers)
        stream = _ConsumerStream(self.sources, self.manifests, self.split, consumer, self.consumers, self.seed,
                                 self.on_error, self.ctx_len, self.batch_size, self._consumer_states[consumer])
        while True:
            x, y, names = stream.next_batch()
            yield x, y, names, consumer, stream.state(), stream.epochs(), stream.skipped_shards()

    def __iter__(self) -> Iterator[Batch]:
        if self.num_workers == 0:
            raw = self._consumer_batches(0)
        else:
            raw = iter(DataLoader(_Workers(self), batch_size=None, num_workers=self.num_workers,
                                  persistent_workers=False, prefetch_factor=2))
        base_skipped = self.skipped_shards
        skipped_by_consumer: dict[int, int] = {}
        epochs_by_consumer: dict[int, dict[str, int]] = {}
        for x, y, names, consumer, state, epochs, skipped in raw:
            self._consumer_states[consumer] = state
            self._next_worker = (self._next_worker + 1) % self.workers
            self.batches += 1
            skipped_by_consumer[consumer] = skipped
            self.skipped_shards = base_skipped + sum(skipped_by_consumer.values())
            epochs_by_consumer[consumer] = epochs
            # a rank has finished an epoch of a source when all its consumers have
            self.epochs = {k: min(e[k] for e in epochs_by_consumer.values()) for k in epochs}
            yield Batch(x, y, list(names), consumer, dict(epochs), self.skipped_shards)

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's position (small, JSON-serializable). Gather it from every rank for a world-size change."""
        return {"version": STATE_VERSION, "seed": self.seed, "split": self.split, "rank": self.rank,
                "world_size": self.world_size, "workers": self.workers, "next_worker": self._next_worker,
                "batches": self.batches, "skipped_shards": self.skipped_shards,
                "sources": [s.key for s in self.sources], "consumers": {str(k): v for k, v in self._consumer_states.items()}}

    def load_state_dict(self, states: dict | list[dict]) -> None:
        """Restore from this rank's state (same layout) or from the states of all ranks of the saved run (any layout)."""
        states = [states] if isinstance(states, dict) else list(states)
        for st in states:
            if st.get("version") != STATE_VERSION:
                raise DataError(f"loader state: version {st.get('version')!r}, expected {STATE_VERSION}")
            if st["seed"] != self.seed or st["split"] != self.split or st["sources"] != [s.key for s in self.sources]:
                raise DataError(f"loader state: saved with other sources ({st['sources']}), seed or split than this loader "
                                f"({[s.key for s in self.sources]})")
        old_world, old_workers = states[0]["world_size"], states[0]["workers"]
        if (old_world, old_workers) == (self.world_size, self.workers):
            mine = next((st for st in states if st["rank"] == self.rank), None)
            if mine is None:
                raise DataError(f"loader state: no state for rank {self.rank}")
            self._consumer_states = {int(k): v for k, v in mine["consumers"].items()}
            self._next_worker, self.batches = mine["next_worker"], mine["batches"]
            self.skipped_shards = mine["skipped_shards"]
            return
        if len(states) != old_world:
            raise DataError(f"loader state: resuming on {self.world_size} ranks x {self.workers} workers from "
                            f"{old_world} x {old_workers} needs the states of all {old_world} saved ranks, got {len(states)}")
        old = {int(k): v for st in states for k, v in st["consumers"].items()}
        self._consumer_states = {c: self._repartitioned(old, old_world * old_workers, c) for c in self._consumer_states}
        self._next_worker, self.batches = 0, sum(st["batches"] for st in states)
        self.skipped_shards = sum(st["skipped_shards"] for st in states)

    def _repartitioned(self, old: dict[int, dict | None], old_consumers: int, consumer: int) -> dict:
        """The new consumer's state after a change of layout (see the module docstring for the guarantee)."""
        sources = {}
        for source, manifest in zip(self.sources, self.manifests):
            probe = SourceCursor(source, manifest, self.split, 0, old_consumers, self.seed, self.on_error)
            positions = {c: (st or {"sources": {}})["sources"].get(source.key) for c, st in old.items()}
            positions = {c: p or {"epoch": 0, "work": None, "item": 0, "doc": 0, "tok": 0, "pending": []}
                         for c, p in positions.items()}
            last_epoch = max(p["epoch"] for p in positions.values())
            remaining: dict[int, list[tuple]] = defaultdict(list)
            for c, p in sorted(positions.items()):
                work = probe._standard_work(p["epoch"], c, old_consumers) if p["work"] is None else [tuple(w) for w in p["work"]]
                if p["item"] < len(work):
                    remaining[p["epoch"]].append((work[p["item"]][0], p["doc"], p["tok"]))
                    remaining[p["epoch"]].extend(work[p["item"] + 1 :])
                for pend in p["pending"]:
                    remaining[pend["epoch"]].extend(tuple(w) for w in pend["work"])
                started = {p["epoch"]} | {pend["epoch"] for pend in p["pending"]}
                for e in range(p["epoch"] + 1, last_epoch + 1):
                    if e not in started:
                        remaining[e].extend(probe._standard_work(e, c, old_consumers))
            epochs = sorted(remaining)
            shares = [{"epoch": e, "work": [list(w) for w in sorted(remaining[e])[consumer::self.consumers]]} for e in epochs]
            first = shares[0] if shares else {"epoch": last_epoch + 1, "work": []}
            start = first["work"][0] if first["work"] else [0, 0, 0]
            sources[source.key] = {"epoch": first["epoch"], "work": first["work"], "item": 0, "doc": start[1],
                                   "tok": start[2], "pending": shares[1:]}
        return {"windows": 0, "sources": sources}


def validation_batches(location: str, ctx_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                       max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over the val split (no shuffle), cut into windows like training; ranks read disjoint shards."""
    manifest = load_manifest(location)
    entries = manifest.shards("val")
    eod = manifest.tokenizer.eod_id
    carry = np.empty(0, dtype=np.int64)  # the stream's tokens after the last window's start
    rows: list[np.ndarray] = []
    produced = 0
    for entry in entries[rank::world_size]:
        stream = np.concatenate([carry, token_stream(read_shard(location, manifest, entry), eod)]).astype(
            np.int64, copy=False)
        count = (len(stream) - 1) // ctx_len if len(stream) > ctx_len else 0
        if count:
            rows.extend(np.lib.stride_tricks.sliding_window_view(stream, ctx_len + 1)[: count * ctx_len : ctx_len])
        carry = stream[count * ctx_len :]
        while len(rows) >= batch_size:
            w = torch.from_numpy(np.stack(rows[:batch_size]))
            del rows[:batch_size]
            yield w[:, :-1], w[:, 1:]
            produced += 1
            if max_batches is not None and produced >= max_batches:
                return
