"""Corpus preparation on Ray: tokens/s with 2 workers against 1 worker (same tasks, same dataset), and the exact
duplicate count of the demo corpus.

    .venv/bin/python bench/data_prep.py [--copies 6 --tasks 8]

The corpus is the embedded demo corpus (builtin:stdlib, ~4 MB of Python standard-library source) written `--copies`
times into one JSONL file under .cache/bench_prep (so the plan cuts it into byte ranges and each task has seconds of
work), tokenized with a 4096-token tokenizer trained on it. One local Ray instance with 2 CPUs is started once and
warmed up (its worker processes started and their imports done), then each setting runs `prepare_shards` into a fresh
folder: the time is the whole prep (tokenize and write phases, commit included; Ray's start-up excluded). Both runs
must give the same dataset. The CPU other processes of the machine used during each run is printed (machine-wide CPU
time minus that of this process and its Ray instance): on a shared 2-CPU machine they take CPU from the 2-worker run
first, so read the ratio against it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rwkv_dist.data import BUILTIN, CorpusStats, Tokenizer, expand_inputs, read_documents, train_tokenizer  # noqa: E402
from rwkv_dist.data import write_shards  # noqa: E402
from rwkv_dist.data.prep import prepare_shards  # noqa: E402


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def busy_cpu() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, by this process and its descendants: the Ray instance it started)."""
    import psutil

    t = psutil.cpu_times()
    machine = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
    ours = 0.0
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            c = p.cpu_times()
            ours += c.user + c.system
        except psutil.Error:
            pass
    return machine, ours


def same_dataset(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all((a / n).read_bytes() == (b / n).read_bytes()
                                                                  for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=6, help="times the demo corpus is repeated in the JSONL input")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--shard-tokens", type=int, default=1_000_000)
    args = parser.parse_args()
    root = REPO / ".cache" / "bench_prep"
    root.mkdir(parents=True, exist_ok=True)
    files = expand_inputs([BUILTIN])
    if not (root / "tok" / "tokenizer.model").exists():
        train_tokenizer(read_documents(files), root / "tok", vocab_size=4096)
    tokenizer = Tokenizer(root / "tok")
    corpus = root / f"stdlib-x{args.copies}.jsonl"
    if not corpus.exists():
        docs = [json.dumps({"text": d}) + "\n" for d in read_documents(files)]
        corpus.write_text("".join(docs) * args.copies)
    for old in root.glob("out-*"):
        shutil.rmtree(old)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # warm-up: both worker processes started, modules imported (webdataset, for the write tasks, too)
        prepare_shards(files[:40], tokenizer, root / "out-warmup", shard_tokens=5_000, workers=2, tasks=4,
                       address=None, echo=None)
        print(f"load average before: {load()}  (CPUs: {os.cpu_count()})")
        results = {}
        for workers in (1, 2):
            t0, (machine0, ours0) = time.perf_counter(), busy_cpu()
            result = prepare_shards([corpus], tokenizer, root / f"out-w{workers}", shard_tokens=args.shard_tokens,
                                    workers=workers, tasks=args.tasks, address=None, echo=None)
            wall = time.perf_counter() - t0
            machine1, ours1 = busy_cpu()
            others = max(machine1 - machine0 - (ours1 - ours0), 0) / wall
            used = (ours1 - ours0) / wall
            tokens = result.manifest.stats["tokens"]
            results[workers] = tokens / wall
            print(f"ray, {workers} worker(s), {result.parts} tasks: {tokens:,} tokens in {wall:.2f} s = "
                  f"{tokens / wall:,.0f} tokens/s (tokenize phase {result.seconds['tokenize']:.2f} s, write "
                  f"{result.seconds['write']:.2f} s); the prep got {used:.2f} CPUs, other processes {others:.2f} of the "
                  f"{os.cpu_count()} meanwhile")
        print(f"load average after: {load()}")
        stats, t0 = CorpusStats(), time.perf_counter()
        write_shards(read_documents([corpus], stats=stats), tokenizer, root / "out-one", stats,
                     shard_tokens=args.shard_tokens, workers=1)
        wall = time.perf_counter() - t0
        print(f"one process (no Ray, 1 sentencepiece thread): {stats.documents:,} documents in {wall:.2f} s = "
              f"{tokens / wall:,.0f} tokens/s")
        assert same_dataset(root / "out-one", root / "out-w1"), "Ray must give the single-process dataset"
        assert same_dataset(root / "out-w1", root / "out-w2"), "1 and 2 workers must give the same dataset"
        print(f"ratio 2 workers / 1 worker: {results[2] / results[1]:.2f}x  (target >= 1.7x)")

        # exact duplicates of the demo corpus, counted by the Ray prep and by one process
        result = prepare_shards(files, tokenizer, root / "out-dedup", dedup=True, workers=2, address=None, echo=None)
        stats = CorpusStats()
        write_shards(read_documents(files, stats=stats), tokenizer, root / "out-dedup-one", stats, dedup=True)
        assert same_dataset(root / "out-dedup", root / "out-dedup-one")
        print(f"demo corpus ({BUILTIN}): {result.stats.documents:,} documents, "
              f"{result.manifest.stats['duplicate_documents']:,} exact duplicates (normalized text) dropped; "
              f"{result.stats.empty} empty files skipped")
    finally:
        ray.shutdown()
        for old in root.glob("out-*"):
            shutil.rmtree(old)


if __name__ == "__main__":
    main()
