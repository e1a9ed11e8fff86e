"""Corpus preparation on Ray (issue 18): the dataset is byte-identical to the single-process one whatever the number of
workers and tasks, a killed driver resumes keeping finished tasks, bad input stops in one line or is skipped and
counted, exact dedup keeps the first copy, the tokenizer sample is uniform and seeded. Real Ray (one local instance
for the module), real sentencepiece, real WebDataset shards."""

from __future__ import annotations

import gzip
import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from rwkv_dist.data import CorpusStats, Tokenizer, read_documents, train_tokenizer, write_shards
from rwkv_dist.data.corpus import Piece, check_readable, expand_inputs, read_piece
from rwkv_dist.data.prep import Progress, plan_parts, prepare_shards, sample_documents, train_tokenizer_on_ray
from rwkv_dist.data.shards import load_manifest, read_shard, verify
from rwkv_dist.errors import DataError

WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "quiet", "seven", "tiger", "lemon",
         "cloud", "paper", "glass", "metal", "ocean", "field", "green", "swift"]


def text(rng: random.Random, i: int) -> str:
    return f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))


def jsonl(docs: list) -> str:
    return "".join(json.dumps({"text": d}) + "\n" for d in docs)


def make_corpus(folder: Path, big_docs: int = 400, seed: int = 0) -> list[Path]:
    """Several kinds of input: a large JSONL (cut into byte ranges), a text file, a .jsonl.gz (never cut), another
    JSONL, an empty file. Duplicates for --dedup: a copy differing only in whitespace and an exact copy inside the
    large file (in different ranges), and a copy of one of its documents in the .gz."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    big = [text(rng, i) for i in range(big_docs)]
    big[big_docs // 2] = big[10].replace(" ", "  ") + "\r\n"
    big[big_docs - 20] = big[20]
    (folder / "a.jsonl").write_text(jsonl(big))
    (folder / "b.txt").write_text(text(rng, 10_000))
    with gzip.open(folder / "c.jsonl.gz", "wt") as f:
        f.write(jsonl([text(rng, 20_000 + i) for i in range(30)] + [big[5]]))
    (folder / "d.jsonl").write_text(jsonl([text(rng, 30_000 + i) for i in range(50)]))
    (folder / "e.txt").write_text("")
    return expand_inputs([str(folder / "*")])


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[Path], Tokenizer]:
    folder = tmp_path_factory.mktemp("prep")
    files = make_corpus(folder / "src")
    return files, Tokenizer(train_tokenizer(read_documents(files), folder / "tok", vocab_size=400))


SHARDS = dict(shard_tokens=500, val_fraction=0.2)


def one_process(files, tokenizer, out: Path, dedup=False, on_bad="stop", **kw) -> Path:
    stats = CorpusStats()
    write_shards(read_documents(files, stats=stats, on_bad=on_bad), tokenizer, out, stats, dedup=dedup,
                 **{**SHARDS, **kw})
    return out


def assert_same_dataset(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()), (names, sorted(p.name for p in b.iterdir()))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert not list(a.parent.glob(f".{b.name}.prep*")) and not list(b.parent.glob(f".{b.name}.prep*")), "staging left"


def documents(location: Path) -> list[tuple]:
    manifest = load_manifest(location)
    return [tuple(d.tolist()) for s in manifest.splits.values() for e in s for d in read_shard(str(location), manifest, e)]


def test_plan_cuts_large_jsonl_at_line_starts(corpus):
    files, _ = corpus
    for tasks in (1, 3, 7, 50):
        parts = plan_parts(files, tasks)
        assert len(parts) <= tasks
        pieces = [p for part in parts for p in part]
        assert [p.path for p in pieces] == sorted((p.path for p in pieces), key=[str(f) for f in files].index)
        for f in files:
            mine = [p for p in pieces if p.path == str(f)]
            ends = [p.start for p in mine[1:]]
            assert [p.end for p in mine[:-1]] == ends and mine[0].start == 0 and mine[-1].end is None, mine
            data = f.read_bytes()
            assert all(data[cut - 1:cut] == b"\n" for cut in ends), "cuts at line starts"
            if f.suffix in (".txt", ".gz"):
                assert len(mine) == 1, "a text file is one document, a .gz cannot be entered in the middle"
            # the ranges' documents, in order, are the file's documents
            got = [d for p in mine for d in read_piece(p, "text", CorpusStats())]
            assert got == list(read_piece(Piece(str(f)), "text", CorpusStats()))
        big = [p for p in pieces if p.path.endswith("a.jsonl")]
        assert len(big) == 1 if tasks == 1 else len(big) >= min(tasks - 2, 5), big


def test_progress_line_counts_documents_tokens_rate_and_eta():
    lines = []
    progress = Progress("tokenize", total_tasks=8, kept=2, total_bytes=10_000, kept_bytes=2_000, echo=lines.append)
    progress.done = 4
    progress.update([(30, 20_000, 1_500), (20, 30_000, 500)])
    progress.start = time.monotonic() - 10  # 10 s in: 2,000 of the 8,000 bytes left to this run read
    progress.tick(final=True)
    assert len(lines) == 1 and re.fullmatch(r"tokenize 4/8 tasks \(2 kept from before\)  50 docs  50,000 tokens  "
                                            r"(5,000|4,99\d) tokens/s  ETA 0:00:3[01]", lines[0]), lines


def test_ray_prep_is_byte_identical_for_any_workers_and_tasks(ray_instance, corpus, tmp_path):
    """1 process; Ray with 1 and 2 workers; 3 and 7 tasks: the same files, names and bytes (manifest included), each
    verified; with --dedup too, keeping the first copy of each text."""
    files, tokenizer = corpus
    reference = one_process(files, tokenizer, tmp_path / "one")
    for workers, tasks in ((1, None), (2, None), (2, 3), (2, 7)):
        out = tmp_path / f"ray-w{workers}-t{tasks}"
        result = prepare_shards(files, tokenizer, out, workers=workers, tasks=tasks, address=None, echo=None, **SHARDS)
        assert_same_dataset(reference, out)
        assert verify(out)[1] == [], out
        assert 1 < result.parts <= (tasks or 4 * workers) and result.parts_kept == 0
    done = subprocess.run([sys.executable, "-m", "rwkv_dist.cli", "data", "verify", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and f"all {len(list(out.glob('*.tar')))} shards match" in done.stdout, done.stderr
    manifest = load_manifest(reference)
    assert len(manifest.splits["train"]) > 7 and manifest.splits["val"], "shards must span task boundaries"
    assert "duplicate_documents" not in manifest.stats

    deduped = one_process(files, tokenizer, tmp_path / "one-dedup", dedup=True)
    for tasks in (3, 7):
        out = tmp_path / f"ray-dedup-{tasks}"
        result = prepare_shards(files, tokenizer, out, dedup=True, workers=2, tasks=tasks, address=None, echo=None,
                                **SHARDS)
        assert_same_dataset(deduped, out)
        assert result.stats.duplicates == 3
    assert load_manifest(deduped).stats["duplicate_documents"] == 3
    # the first copy is the one kept: the whitespace variant of doc 10 (in a later range) is gone, doc 10 stays
    kept = set(documents(deduped))
    big = [json.loads(line)["text"] for line in files[0].read_text().splitlines()]
    first, variant = (tuple(ids) for ids in tokenizer.encode([big[10], big[200]]))
    assert first in kept and variant not in kept and len(documents(deduped)) == len(documents(reference)) - 3


def test_existing_dataset_and_foreign_folder_are_refused(ray_instance, corpus, tmp_path):
    files, tokenizer = corpus
    ds = one_process(files, tokenizer, tmp_path / "ds")
    before = {p.name: p.read_bytes() for p in ds.iterdir()}
    with pytest.raises(DataError, match="already holds a dataset"):
        prepare_shards(files, tokenizer, ds, address=None, echo=None, **SHARDS)
    assert {p.name: p.read_bytes() for p in ds.iterdir()} == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty and not a dataset being prepared"):
        prepare_shards(files, tokenizer, tmp_path / "mine", address=None, echo=None, **SHARDS)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_interrupted_write_phase_resumes_keeping_written_shards(ray_instance, corpus, tmp_path):
    """A write task that fails (a folder stands where its shard goes) after others finished: the rerun keeps every
    part and every finished write task, picks the task count of the first run, and ends with the single-process
    dataset."""
    files, tokenizer = corpus
    reference = one_process(files, tokenizer, tmp_path / "one")
    out = tmp_path / "out"
    (out / "val-000002.tar").mkdir(parents=True)  # in the last run of shards: the write tasks before it finish
    with pytest.raises(IsADirectoryError):
        prepare_shards(files, tokenizer, out, workers=1, tasks=7, address=None, echo=None, **SHARDS)
    assert not (out / "manifest.json").exists() and load_manifest_fails(out)
    (out / "val-000002.tar").rmdir()
    result = prepare_shards(files, tokenizer, out, workers=1, address=None, echo=None, **SHARDS)
    # one worker runs the 7 write tasks in order: those before the failing one finished and are kept
    names = [e.file for split in ("train", "val") for e in load_manifest(reference).splits[split]]
    failing = next(i for i, run in enumerate(np.array_split(np.arange(len(names)), 7))
                   if names.index("val-000002.tar") in run)
    assert result.parts_kept == result.parts == 7 and result.writes_kept == failing > 0
    assert_same_dataset(reference, out)


def load_manifest_fails(location: Path) -> bool:
    with pytest.raises(DataError, match="cannot read the dataset manifest"):
        load_manifest(location)
    return True


def bad_corpus(folder: Path, good: list[Path]) -> tuple[list[Path], int]:
    """The good corpus plus: a .gz that is not gzip, a JSONL whose late lines (beyond its first range) are not JSON,
    lack the text field, or hold a number as text. Returns the files and the bad JSON line's number."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.jsonl.gz").write_bytes(b"this was never gzip")
    rng = random.Random(5)
    lines = [json.dumps({"text": text(rng, 40_000 + i)}) for i in range(300)]
    lines[250] = '{"text": "unterminated'
    lines[260] = json.dumps({"body": "other field"})
    lines[270] = json.dumps({"text": 42})
    (folder / "f.jsonl").write_text("\n".join(lines) + "\n")
    return sorted(good + [folder / "broken.jsonl.gz", folder / "f.jsonl"], key=str), 251


def test_bad_input_stops_in_one_line_or_is_skipped_and_counted(ray_instance, corpus, tmp_path):
    good, tokenizer = corpus
    files, bad_line = bad_corpus(tmp_path / "bad", good)
    bad_json = f"{tmp_path / 'bad' / 'f.jsonl'}:{bad_line}: not valid JSON"
    # stop: the unreadable file before anything starts, in one line naming it
    with pytest.raises(DataError, match=r"broken.jsonl.gz: cannot read \(BadGzipFile"):
        check_readable(files)
    with pytest.raises(DataError, match=r"broken.jsonl.gz: cannot read"):
        prepare_shards(files, tokenizer, tmp_path / "out", workers=2, tasks=7, address=None, echo=None, **SHARDS)
    assert not (tmp_path / "out").exists()
    # stop: a bad line deep in a later byte range is named by its line in the whole file, as one process names it
    files = [f for f in files if not f.name.startswith("broken")]
    with pytest.raises(DataError) as single:
        one_process(files, tokenizer, tmp_path / "one")
    with pytest.raises(DataError) as ray_error:
        prepare_shards(files, tokenizer, tmp_path / "out", workers=2, tasks=9, address=None, echo=None, **SHARDS)
    assert str(single.value).startswith(bad_json) and str(ray_error.value).startswith(bad_json), ray_error.value
    assert "\n" not in str(ray_error.value) and "finished tasks kept" in str(ray_error.value)
    assert not (tmp_path / "one").exists() and not (tmp_path / "out" / "manifest.json").exists()
    # and the command says it in one line (a CLI joined to the module's Ray instance)
    import ray

    done = subprocess.run([sys.executable, "-m", "rwkv_dist.cli", "data", "shards", "--tokenizer", str(tokenizer.path),
                           "--input", *map(str, files), "--out", str(tmp_path / "cli"), "--ray", "--address",
                           ray.get_runtime_context().gcs_address, "--tasks", "9", "--workers", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith(f"rwkv-dist data shards: error: {bad_json}"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    # skip: counted in the manifest, and still the single-process dataset byte for byte
    files, _ = bad_corpus(tmp_path / "bad", good)
    reference = one_process(files, tokenizer, tmp_path / "skip-one", on_bad="skip")
    result = prepare_shards(files, tokenizer, tmp_path / "skip-ray", on_bad="skip", workers=2, tasks=9, address=None,
                            echo=None, **SHARDS)
    assert_same_dataset(reference, tmp_path / "skip-ray")
    stats = load_manifest(reference).stats
    assert (stats["unreadable_files"], stats["invalid_json_lines"], stats["missing_text_lines"]) == (1, 1, 2)
    assert result.stats.first_problem.startswith(f"{tmp_path / 'bad' / 'broken.jsonl.gz'}: cannot read")
    # a truncated .gz keeps what was read before the damage and is counted
    data = gzip.compress(jsonl([text(random.Random(1), i) for i in range(200)]).encode())
    (tmp_path / "bad" / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    stats = CorpusStats()
    docs = list(read_documents([tmp_path / "bad" / "cut.jsonl.gz"], stats=stats, on_bad="skip"))
    assert 0 < len(docs) < 200 and stats.unreadable_files == 1


def test_tokenizer_sample_is_uniform_over_inputs_seeded_and_the_same_on_ray(ray_instance, corpus, tmp_path):
    files, _ = corpus
    docs = list(read_documents(files))
    budget = sum(map(len, docs)) // 3
    local, stats = sample_documents(files, budget, seed=1)
    on_ray, _ = sample_documents(files, budget, seed=1, use_ray=True, workers=2, tasks=5, address=None, echo=None)
    assert local == on_ray and stats.documents == len(docs)
    assert budget <= sum(map(len, local)) < budget + max(map(len, local))
    where = [docs.index(t) for t in local]
    assert where == sorted(where), "the sample is fed to sentencepiece in input order"
    assert min(where) < len(docs) // 10 and max(where) > len(docs) * 9 // 10, "drawn from all inputs, not the first"
    last_file = sum(1 for t in local if t in set(read_documents([files[3]])))  # d.jsonl: 50 of ~480 documents
    assert 5 <= last_file <= 30, last_file
    assert sample_documents(files, budget, seed=2)[0] != local and sample_documents(files, budget, seed=1)[0] == local
    assert sample_documents(files, 10**9, seed=1)[0] == docs, "a corpus under the budget is used whole"
    # sentencepiece trained in a Ray task gives the model trained here
    here = train_tokenizer(local, tmp_path / "here", vocab_size=300, seed=1)
    there = train_tokenizer_on_ray(local, tmp_path / "there", vocab_size=300, seed=1, address=None)
    assert here.read_bytes() == there.read_bytes()


def cli(*args, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rwkv_dist.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def wait_for_no_task(name: str, timeout: float = 30) -> None:
    """Until no Ray worker runs a task called `name` (a worker's process title is ray::NAME while it does)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        busy = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                busy += [p] if any(f"ray::{name}" in part for part in p.info["cmdline"] or []) else []
            except psutil.Error:
                pass
        if not busy:
            return
        time.sleep(0.1)
    raise AssertionError(f"Ray tasks {name} still running {timeout} s after their driver died")


def test_driver_sigkill_then_rerun_keeps_finished_tasks(ray_instance, corpus, tmp_path):
    """SIGKILL the driver (a CLI joined to the module's Ray instance, as on a cluster) once a first task has
    finished; the same command then redoes only the rest (it says how many), and the dataset equals an uninterrupted
    prep's."""
    import ray

    files, tokenizer = corpus
    src = tmp_path / "src"
    make_corpus(src, big_docs=3000, seed=3)  # ~750 kB: a task takes long enough for the kill to land mid-prep
    out, staging = tmp_path / "out", tmp_path / ".out.prep"
    args = ["data", "shards", "--tokenizer", tokenizer.path, "--input", f"{src}/*", "--out", out, "--ray",
            "--address", ray.get_runtime_context().gcs_address, "--workers", 1, "--tasks", 8,
            "--shard-tokens", 20_000, "--val-fraction", 0.1, "--dedup"]
    proc = cli(*args)
    deadline = time.time() + 240
    while not list((staging / "parts").glob("*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    _, alive = psutil.wait_procs(family, timeout=20)
    for p in alive:  # never leave a stray process behind, whatever Ray did
        p.kill()
    assert proc.returncode == -signal.SIGKILL and not (out / "manifest.json").exists()
    wait_for_no_task("tokenize_part")  # Ray ends the dead driver's tasks: nothing writes into the staging now
    finished = sorted((staging / "parts").glob("*.json"))
    assert 1 <= len(finished) < 8, finished
    # a finished part whose stream no longer matches its sha256 is redone, not trusted
    damaged = staging / "parts" / f"{finished[0].stem}.train.bin"
    damaged.write_bytes(b"\0" + damaged.read_bytes()[1:])

    rerun = cli(*args)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    kept = int(re.search(r"tokenize 8 \((\d+) kept from an earlier run, (\d+) run now\)", stdout).group(1))
    assert kept == len(finished) - 1, stdout
    assert re.search(r"tokenize +8/8 tasks .* tokens/s +ETA", stdout), stdout
    reference = tmp_path / "reference"
    stats = CorpusStats()
    write_shards(read_documents(expand_inputs([f"{src}/*"]), stats=stats), tokenizer, reference, stats,
                 shard_tokens=20_000, val_fraction=0.1, dedup=True)
    assert_same_dataset(reference, out)
