"""Data pipeline: tokenizer round trip, deterministic shards, verify, and the streaming loader's exactness."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli

from rwkv_dist.data import CorpusStats, Source, TokenLoader, Tokenizer, read_documents, train_tokenizer, write_shards
from rwkv_dist.data.shards import load_manifest, verify
from rwkv_dist.data.stream import SourceCursor
from rwkv_dist.data.tokenizer import EOD_ID
from rwkv_dist.errors import DataError

WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "quiet", "seven", "tiger", "lemon",
         "cloud", "paper", "glass", "metal", "ocean", "field", "green", "swift"]


def make_corpus(folder: Path, n_docs: int, seed: int, prefix: str = "doc") -> list[str]:
    """Distinct documents of 20-60 words (longer than the test windows), as one JSONL file."""
    rng = random.Random(seed)
    docs = [f"{prefix} {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for i in range(n_docs)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tok")
    make_corpus(folder, 200, seed=0)
    extra = "Tabs\there, CRLF\r\nemoji 😀🚀, CJK 中文字符, accents é ü ñ, math ∑∫, spaces   end\n" * 20
    (folder / "extra.txt").write_text(extra)
    files = [folder / "corpus.jsonl", folder / "extra.txt"]
    return Tokenizer(train_tokenizer(read_documents(files), folder, vocab_size=400))


def build(folder: Path, docs_seed: int, tokenizer: Tokenizer, n_docs=60, shard_tokens=300, prefix="doc", **kw):
    src = folder / "src"
    docs = make_corpus(src, n_docs, docs_seed, prefix)
    stats = CorpusStats()
    write_shards(read_documents([src / "corpus.jsonl"], stats=stats), tokenizer, folder / "ds", stats,
                 shard_tokens=shard_tokens, **kw)
    return docs, str(folder / "ds")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer):
    docs, location = build(tmp_path_factory.mktemp("data"), 1, tokenizer)
    return docs, location


def doc_tokens(tokenizer: Tokenizer, docs: list[str]) -> Counter:
    return Counter(tuple(ids) for ids in tokenizer.encode(docs))


# ---- tokenizer and shards ----

def test_tokenizer_round_trip_is_lossless(tokenizer):
    text = ("  Leading spaces\n\n\tTabs\tinside\r\nWindows line end\r\n"
            "emoji 😀🚀 and CJK 中文字符 plus unseen 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ\n    runs     of spaces   \n")
    ids = tokenizer.encode([text])[0]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eod_id == EOD_ID == 0 and tokenizer.sp.id_to_piece(0) == "<|endoftext|>"
    assert tokenizer.sp.piece_to_id("\n") == 3 and tokenizer.sp.piece_to_id("\t") == 5


def test_shards_are_byte_identical_across_builds(tmp_path, tokenizer):
    _, a = build(tmp_path / "a", 3, tokenizer, val_fraction=0.2)
    _, b = build(tmp_path / "b", 3, tokenizer, val_fraction=0.2)
    files = sorted(p.name for p in Path(a).iterdir())
    assert files == sorted(p.name for p in Path(b).iterdir()) and len(files) > 4
    for name in files:
        assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes(), name
    manifest = load_manifest(a)
    assert manifest.splits["val"] and manifest.dtype == "uint16"
    assert sum(e.samples for s in manifest.splits.values() for e in s) == 60


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "overwritten":  # garbage in the middle of a sample's bytes: tar still parses, contents differ
        mid = len(data) // 2
        path.write_bytes(data[:mid] + b"\xff" * 64 + data[mid + 64 :])
    elif how == "wrong sha":  # a valid tar with other contents (e.g. a shard swapped in from another dataset)
        path.write_bytes(data.replace(b"rwkv", b"RWKV"))


@pytest.mark.parametrize("how", ["missing", "truncated", "overwritten", "wrong sha"])
def test_verify_and_loader_catch_damage(tmp_path, tokenizer, how):
    docs, location = build(tmp_path, 4, tokenizer)
    victim = Path(location) / "train-000002.tar"
    damage(victim, how)
    lines, damaged = verify(location)
    assert damaged == ["train-000002.tar"]
    result = run_cli("data", "verify", location)
    assert result.returncode == 1 and "train-000002.tar" in result.stderr

    # on_error=fail stops naming the shard; on_error=skip warns, counts, and delivers every other document
    strict = TokenLoader(location, ctx_len=8, batch_size=1, on_error="fail", world_size=1)
    with pytest.raises(DataError, match="train-000002.tar"):
        for _ in iter_epoch0(strict):
            pass
    lenient = TokenLoader(location, ctx_len=8, batch_size=1, on_error="skip")
    with pytest.warns(UserWarning, match="skipping damaged shard"):
        got = epoch0_documents(lenient)
    assert lenient.skipped_shards in (1, 2)  # counted each time it is met: once per epoch (epoch 1 may start on it)
    manifest = load_manifest(location)
    expected = doc_tokens(tokenizer, docs)
    lost = sum(e.samples for e in manifest.splits["train"] if e.file == "train-000002.tar")
    assert sum(got.values()) == len(docs) - lost and not (got - expected), "no silent loss: only the named shard"


# ---- the loader ----

def iter_epoch0(loader: TokenLoader):
    """Batches until every consumer of the loader has moved into epoch 1, each with its consumer."""
    done: set[int] = set()
    for batch in loader:
        if batch.consumer in done:
            continue
        yield batch
        if min(batch.epochs.values()) >= 1:
            done.add(batch.consumer)
            if len(done) == loader.workers:
                return


def epoch0_documents(loader: TokenLoader) -> Counter:
    """Documents (token tuples) each consumer finished in epoch 0, rebuilt from the inputs it delivered.

    Windows overlap by one token, so a consumer's inputs concatenated are its token stream. Test documents are longer
    than a window, so the few epoch-1 tokens read before the epoch flag flips never hold a whole document."""
    streams: dict[int, list[int]] = {}
    for batch in iter_epoch0(loader):
        for row in batch.inputs.tolist():
            streams.setdefault(batch.consumer, []).extend(row)
    docs = Counter()
    for stream in streams.values():
        current: list[int] = []
        for t in stream:
            if t == EOD_ID:
                docs[tuple(current)] += 1
                current = []
            else:
                current.append(t)
    return docs


def test_every_document_exactly_once_with_2_ranks_x_2_workers(dataset, tokenizer):
    docs, location = dataset
    got = Counter()
    for rank in range(2):
        got += epoch0_documents(TokenLoader(location, ctx_len=8, batch_size=3, rank=rank, world_size=2,
                                            num_workers=2, seed=5))
    assert got == doc_tokens(tokenizer, docs)


def test_two_real_ranks_on_gloo_deliver_every_document_once(dataset, tokenizer, tmp_path):
    """Two processes, two DataLoader workers each: all_gather of what each rank read covers the corpus exactly once."""
    docs, location = dataset
    script = Path(__file__).with_name("dist_data_worker.py")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    procs = [subprocess.Popen([sys.executable, str(script), location, str(rank), "2", str(tmp_path / f"r{rank}.json")],
                              env=env) for rank in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    gathered = json.loads((tmp_path / "r0.json").read_text())
    got = Counter(tuple(d) for rank_docs in gathered for d in rank_docs)
    assert got == doc_tokens(tokenizer, docs)


def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)
                                    and x.sources == y.sources for x, y in zip(a, b))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restore_continues_exactly(dataset, num_workers):
    """Stop after k batches, restore in a fresh loader: the next batches are those of an uninterrupted stream.
    k covers the first batch, mid-shard, shard ends and epoch boundaries (an epoch is ~85 batches here)."""
    _, location = dataset
    make = lambda: TokenLoader(location, ctx_len=8, batch_size=4, num_workers=num_workers, seed=2)  # noqa: E731
    reference = batches(make(), 260)
    assert max(reference[-1].epochs.values()) >= 2, "the run must cross epoch boundaries"
    for k in (1, 7, 33, 101, 170):
        first = make()
        batches(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # states survive JSON (they go into checkpoints)
        resumed = make()
        resumed.load_state_dict(state)
        assert same(batches(resumed, 260 - k)[:40], reference[k : k + 40]), f"k={k}"


def tokens_until_epoch1(cursors: list[SourceCursor]) -> Counter:
    """Every token each cursor reads from its position to the end of epoch 0, stepping one token at a time."""
    seen = Counter()
    for cursor in cursors:
        while cursor.position()[0] == 0:
            seen[int(cursor.take(2, EOD_ID)[0])] += 1
    return seen


def test_world_size_change_neither_repeats_nor_skips(dataset, tokenizer):
    """Save on 2 ranks x 2 workers mid-epoch, resume on 3 ranks x 1 worker: what the old consumers read plus what the
    new ones read to the end of the epoch is the corpus (+ one end-of-document token each), token for token."""
    docs, location = dataset
    old = [TokenLoader(location, ctx_len=8, batch_size=2, rank=r, world_size=2, num_workers=2, seed=9) for r in range(2)]
    read = Counter()
    for loader, n in zip(old, (9, 14)):
        for batch in batches(loader, n):
            read.update(batch.inputs.flatten().tolist())
    states = [json.loads(json.dumps(loader.state_dict())) for loader in old]
    manifest = load_manifest(location)
    for rank in range(3):
        new = TokenLoader(location, ctx_len=8, batch_size=2, rank=rank, world_size=3, seed=9)
        new.load_state_dict(states)
        source = new.sources[0]
        cursor_state = new._consumer_states[rank]["sources"][source.key]
        read += tokens_until_epoch1([SourceCursor(source, manifest, "train", rank, 3, 9, "fail", cursor_state)])
    expected = Counter(t for ids in tokenizer.encode(docs) for t in ids)
    expected[EOD_ID] += len(docs)
    assert read == expected


def test_mixture_proportions(tmp_path, tokenizer):
    _, web = build(tmp_path / "web", 11, tokenizer, prefix="web")
    _, code = build(tmp_path / "code", 12, tokenizer, prefix="code")
    sources = [Source(web, 0.7, "web"), Source(code, 0.3, "code")]
    loader = TokenLoader(sources, ctx_len=4, batch_size=20, seed=3)
    rows = [name for batch in batches(loader, 100) for name in batch.sources]
    share = rows.count("web") / len(rows)
    assert abs(share - 0.7) < 4 * (0.7 * 0.3 / len(rows)) ** 0.5  # within 4 sigma of 2000 draws
    # and it resumes exactly too
    first = TokenLoader(sources, ctx_len=4, batch_size=20, seed=3)
    batches(first, 13)
    second = TokenLoader(sources, ctx_len=4, batch_size=20, seed=3)
    second.load_state_dict(first.state_dict())
    assert same(batches(second, 10), batches(TokenLoader(sources, ctx_len=4, batch_size=20, seed=3), 23)[13:])


def test_pipe_urls_are_read(dataset):
    docs, location = dataset
    loader = TokenLoader(Source(f"pipe:cat {location}/{{}}"), ctx_len=8, batch_size=2)
    assert same(batches(loader, 5), batches(TokenLoader(Source(f"pipe:cat {location}/{{}}"), ctx_len=8, batch_size=2), 5))
    assert batches(loader, 1)[0].inputs.shape == (2, 8)


# ---- bad input ----

def one_line_error(result, needle: str):
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr


def test_bad_corpora(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n")
    one_line_error(run_cli("data", "tokenizer", "--input", empty, "--vocab-size", 300, "--out", tmp_path / "t"),
                   "the corpus has no text")
    one_line_error(run_cli("data", "shards", "--tokenizer", tokenizer.path, "--input", empty, "--out", tmp_path / "d"),
                   "no non-empty documents")
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"body": "other field"}\n')
    one_line_error(run_cli("data", "shards", "--tokenizer", tokenizer.path, "--input", jsonl, "--out", tmp_path / "d"),
                   f"{jsonl}:2: no text field 'text' (has: body)")
    small = tmp_path / "small.txt"
    small.write_text("tiny corpus " * 10)
    one_line_error(run_cli("data", "tokenizer", "--input", small, "--vocab-size", 5000, "--out", tmp_path / "t"),
                   "Vocabulary size too high")
    one_line_error(run_cli("data", "tokenizer", "--input", tmp_path / "nothing*.txt", "--vocab-size", 300,
                           "--out", tmp_path / "t"), "no files match")
    assert not (tmp_path / "d").exists() and not (tmp_path / "t" / "tokenizer.model").exists()


def test_empty_and_non_utf8_documents_are_counted(tmp_path, tokenizer):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_bytes("valid text ".encode() * 5 + b"\xff\xfe broken bytes")
    (folder / "b.txt").write_text("")
    (folder / "c.jsonl").write_text('{"text": "  "}\n{"text": "real document here"}\n')
    stats = CorpusStats()
    docs = list(read_documents(sorted(folder.iterdir()), stats=stats))
    assert len(docs) == 2 and "\ufffd" in docs[0]
    assert (stats.empty, stats.invalid_utf8, stats.documents) == (2, 1, 2)


def test_tokenizer_manifest_mismatch(tmp_path, dataset, tokenizer):
    _, location = dataset
    with pytest.raises(DataError, match="made with tokenizer .*, the run uses 000000000000…"):
        TokenLoader(location, ctx_len=8, batch_size=1, tokenizer_sha256="0" * 64)
    folder = tmp_path / "other"
    make_corpus(folder, 50, seed=7)
    other = Tokenizer(train_tokenizer(read_documents([folder / "corpus.jsonl"]), folder, vocab_size=300))
    _, other_ds = build(tmp_path, 8, other)
    with pytest.raises(DataError, match=f"made with tokenizer .*, {location} uses"):
        TokenLoader([Source(location, name="a"), Source(other_ds, name="b")], ctx_len=8, batch_size=1)


def test_loader_arguments_are_checked(dataset, tmp_path):
    _, location = dataset
    with pytest.raises(DataError, match="shards for 200 consumers"):
        TokenLoader(location, ctx_len=8, batch_size=1, world_size=100, num_workers=2)
    with pytest.raises(DataError, match="on_error must be"):
        TokenLoader(location, ctx_len=8, batch_size=1, on_error="ignore")
    with pytest.raises(DataError, match="cannot read the dataset manifest"):
        TokenLoader(str(tmp_path / "nowhere"), ctx_len=8, batch_size=1)
    with pytest.raises(DataError, match="weights must be positive"):
        TokenLoader(Source(location, weight=0), ctx_len=8, batch_size=1)


def test_validation_pass_covers_the_val_split_once(tmp_path, tokenizer):
    docs, location = build(tmp_path, 13, tokenizer, n_docs=80, val_fraction=0.3)
    manifest = load_manifest(location)
    val_tokens = sum(e.tokens for e in manifest.splits["val"]) + sum(e.samples for e in manifest.splits["val"])
    from rwkv_dist.data import validation_batches

    rows = [x for r in range(2) for x, _ in validation_batches(location, ctx_len=8, batch_size=1, rank=r, world_size=2)]
    assert rows and len(rows) * 8 <= val_tokens < (len(rows) + 2 * 2) * 8  # all but the last partial window per rank
    again = [x for x, _ in validation_batches(location, ctx_len=8, batch_size=1)]
    assert len(again) >= len(rows) - 1 and torch.equal(again[0], validation_batches(location, 8, 1).__next__()[0])


# ---- the fast read path: plain-tar reader, once-per-process sha256, packing ----

def webdataset_samples(data: bytes) -> list[dict]:
    import io

    from webdataset import tariterators

    files = ({**f, "__url__": "u"} for f in tariterators.tar_file_iterator(io.BytesIO(data)))
    return [{k: v for k, v in s.items() if k != "__url__"} for s in tariterators.group_by_keys(files)]


def tar_bytes(members: list[tuple[str, bytes | None]], fmt, compress: str = "") -> bytes:
    """A tar made by tarfile itself (name, data; data None: a directory)."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compress}", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size, info.mtime = len(data), 1.5
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_plain_tar_reader_reads_what_webdataset_reads(dataset):
    """Our shards take the fast path and read exactly as webdataset reads them; any other tar (other formats, long
    names, directories, metadata files, compression, duplicates, bad checksums, truncation) is left to webdataset."""
    import tarfile

    from rwkv_dist.data.shards import _plain_tar_samples

    _, location = dataset
    for path in sorted(Path(location).glob("*.tar")):
        data = path.read_bytes()
        fast = _plain_tar_samples(data)
        assert fast is not None, path
        assert [{k: (v if k == "__key__" else bytes(v)) for k, v in s.items()} for s in fast] == webdataset_samples(data)
    plain = [("000001.tokens.u16", b"\x01\x00\x02\x00"), ("000001.txt", b"hi"), ("000002.tokens.u16", b"")]
    pax_ok = tar_bytes(plain + [("d" * 120 + ".tokens.u16", b"\x05\x00")], tarfile.PAX_FORMAT)  # a pax path record
    assert _plain_tar_samples(pax_ok) is not None
    assert [s["__key__"] for s in _plain_tar_samples(pax_ok)] == ["000001", "000002", "d" * 120]
    left_to_webdataset = {
        "gnu": tar_bytes(plain, tarfile.GNU_FORMAT),
        "directory": tar_bytes([("sub", None)] + plain, tarfile.PAX_FORMAT),
        "gzip": tar_bytes(plain, tarfile.PAX_FORMAT, "gz"),
        "duplicate": tar_bytes(plain + [("000002.tokens.u16", b"\x03\x00")], tarfile.USTAR_FORMAT),
        "truncated": pax_ok[:1500],
        "bad checksum": pax_ok[:2048] + bytes([pax_ok[2048] ^ 1]) + pax_ok[2049:],
        "empty": b"",
    }
    for why, data in left_to_webdataset.items():
        assert _plain_tar_samples(data) is None, why
    meta = tar_bytes([("__meta__", b"x"), ("noext", b"y")] + plain, tarfile.USTAR_FORMAT)  # skipped as webdataset does
    assert [{k: (v if k == "__key__" else bytes(v)) for k, v in s.items()} for s in _plain_tar_samples(meta)] \
        == webdataset_samples(meta)


def swap_tokens(path: Path) -> None:
    """Swap two different tokens of the first document, keeping the file's size and mtime: the tar, the token ids and
    the counts all stay valid, so only the sha256 can tell."""
    stat, data = path.stat(), bytearray(path.read_bytes())
    first = 1536  # our shards: pax header + its records, the member's header, then its tokens
    i = next(i for i in range(first + 2, first + 64, 2) if data[i : i + 2] != data[first : first + 2])
    data[first : first + 2], data[i : i + 2] = data[i : i + 2], data[first : first + 2]
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def shard_cache(monkeypatch, settle_ns: int):
    from rwkv_dist.data import shards

    cache = shards.ShardCache(settle_ns=settle_ns)
    monkeypatch.setattr(shards, "SHARD_CACHE", cache)
    return cache


def test_each_shard_is_hashed_once_per_process_until_it_changes(tmp_path, tokenizer, monkeypatch):
    from rwkv_dist.data.shards import ShardDamaged, read_shard

    cache = shard_cache(monkeypatch, settle_ns=-(1 << 62))  # every file counts as settled, however fresh
    _, location = build(tmp_path, 21, tokenizer)
    manifest = load_manifest(location)
    entries = manifest.splits["train"]
    loader = TokenLoader(location, ctx_len=8, batch_size=4)
    batches(loader, 300)
    assert max(loader.epochs.values()) >= 2 and cache.hashes == len(entries), "three epochs, one hash per shard"

    victim, entry = Path(location) / entries[1].file, entries[1]
    good = victim.read_bytes()
    docs = read_shard(location, manifest, entry)
    assert cache.hashes == len(entries)
    verify(location)
    assert cache.hashes == 2 * len(entries), "verify always hashes"

    victim.write_bytes(good + bytes(512))  # size changed (a valid tar still: zero blocks at the end)
    with pytest.raises(ShardDamaged, match="sha256"):
        read_shard(location, manifest, entry)
    victim.write_bytes(good)
    stat = victim.stat()
    swap_tokens(victim)  # same size, and the mtime moved on
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ShardDamaged, match="sha256"):
        read_shard(location, manifest, entry)
    replacement = victim.with_suffix(".new")  # same bytes, same times, another file renamed over it: hashed again
    replacement.write_bytes(good)
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    replacement.replace(victim)
    before = cache.hashes
    assert all((a == b).all() for a, b in zip(read_shard(location, manifest, entry), docs))
    assert cache.hashes == before + 1

    # through the loader: a shard changed after it was verified is refused, and skipped
    swap_tokens(victim)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    with pytest.warns(UserWarning, match="skipping damaged shard"):
        batches(TokenLoader(location, ctx_len=8, batch_size=4), 100)


def test_a_fresh_shard_is_hashed_on_every_read(tmp_path, tokenizer, monkeypatch):
    """Under the default settle time a just-written file is never remembered: a same-size rewrite within one tick of
    the file system's clock (same mtime and ctime) is still caught."""
    from rwkv_dist.data.shards import ShardDamaged, read_shard

    cache = shard_cache(monkeypatch, settle_ns=3600 * 10**9)
    _, location = build(tmp_path, 22, tokenizer)
    manifest = load_manifest(location)
    entry = manifest.splits["train"][0]
    victim = Path(location) / entry.file
    read_shard(location, manifest, entry)
    read_shard(location, manifest, entry)
    assert cache.hashes == 2
    swap_tokens(victim)  # same size, mtime restored: likely the same ctime too, within a tick
    with pytest.raises(ShardDamaged, match="sha256"):
        read_shard(location, manifest, entry)


def test_windows_are_the_documented_stream(dataset):
    """The loader's windows, against the module docstring built independently (webdataset's reader, lists): shards
    in the epoch's shuffled order, each shard's documents shuffled, each followed by eod, cut every ctx_len tokens."""
    import webdataset as wds

    from rwkv_dist.data.stream import _seed_words

    _, location = dataset
    manifest = load_manifest(location)
    entries = manifest.splits["train"]
    eod, ctx, seed = manifest.tokenizer.eod_id, 7, 4
    loader = TokenLoader(location, ctx_len=ctx, batch_size=3, seed=seed)
    key = loader.sources[0].key
    stream: list[int] = []
    for epoch in range(3):
        order = np.random.default_rng(_seed_words(seed, epoch, key, "train")).permutation(len(entries))
        for shard in order:
            samples = list(wds.WebDataset(f"{location}/{entries[shard].file}", shardshuffle=False, empty_check=False))
            docs = [np.frombuffer(s["tokens.u16"], dtype="<u2").tolist() for s in samples]
            perm = np.random.default_rng(_seed_words(seed, epoch, key, entries[shard].file)).permutation(len(docs))
            for i in perm:
                stream += docs[i] + [eod]
    got = batches(loader, (len(stream) - 1) // ctx // 3 - 1)
    want = torch.tensor([stream[k * ctx : (k + 1) * ctx + 1] for k in range(3 * len(got))]).view(len(got), 3, ctx + 1)
    assert torch.equal(torch.stack([b.inputs for b in got]), want[:, :, :-1])
    assert torch.equal(torch.stack([b.targets for b in got]), want[:, :, 1:])


def test_validation_windows_are_the_documented_stream(tmp_path, tokenizer):
    from rwkv_dist.data import validation_batches
    from rwkv_dist.data.shards import read_shard

    _, location = build(tmp_path, 23, tokenizer, n_docs=80, val_fraction=0.3)
    manifest = load_manifest(location)
    eod = manifest.tokenizer.eod_id
    for ctx, bs, rank, world in ((8, 1, 0, 1), (5, 3, 1, 2), (1, 2, 0, 2)):
        stream = [t for e in manifest.splits["val"][rank::world] for d in read_shard(location, manifest, e)
                  for t in [*d.tolist(), eod]]
        rows = [stream[k * ctx : (k + 1) * ctx + 1] for k in range((len(stream) - 1) // ctx)]
        rows = rows[: len(rows) // bs * bs]
        got = [w for x, y in validation_batches(location, ctx, bs, rank, world) for w in (x, y)]
        want = torch.tensor(rows).view(-1, bs, ctx + 1)
        assert torch.equal(torch.stack(got[0::2]), want[:, :, :-1]) and torch.equal(torch.stack(got[1::2]), want[:, :, 1:])
    assert len(list(validation_batches(location, 4, 1, max_batches=3))) == 3
