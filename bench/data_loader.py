"""Data path speed: the token loader (stream + sha check + unpack + pack into windows) against a raw webdataset read of
the same shards, and sentencepiece batch encoding; one process, side by side.

    .venv/bin/python bench/data_loader.py [--ctx-len 1024 --batch-size 8]

Builds the embedded demo corpus (builtin:stdlib: ~4 MB of Python standard-library source) into a tokenizer and shards
under .cache/bench_data the first time. The raw read is plain `webdataset.WebDataset` iteration that touches every
sample's bytes; the loader does that plus the manifest sha256 check, the per-shard document shuffle and the packing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import webdataset as wds  # noqa: E402

from rwkv_dist.data import (  # noqa: E402
    BUILTIN, CorpusStats, TokenLoader, Tokenizer, expand_inputs, load_manifest, read_documents, train_tokenizer,
    write_shards,
)


def prepare(folder: Path) -> tuple[Tokenizer, str, list[str]]:
    files = expand_inputs([BUILTIN])
    if not (folder / "tok" / "tokenizer.model").exists():
        train_tokenizer(read_documents(files), folder / "tok", vocab_size=4096)
    tokenizer = Tokenizer(folder / "tok")
    docs = list(read_documents(files))
    if not (folder / "ds" / "manifest.json").exists():
        write_shards(iter(docs), tokenizer, folder / "ds", CorpusStats(), shard_tokens=200_000)
    return tokenizer, str(folder / "ds"), docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    tokenizer, location, docs = prepare(REPO / ".cache" / "bench_data")
    manifest = load_manifest(location)
    tokens_per_epoch = sum(e.tokens for e in manifest.splits["train"])

    urls = [f"{location}/{e.file}" for e in manifest.splits["train"]]
    start, raw_tokens = time.perf_counter(), 0
    for _ in range(args.epochs):
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            raw_tokens += len(sample["tokens.u16"]) // 2
    raw_rate = raw_tokens / (time.perf_counter() - start)

    loader = TokenLoader(location, ctx_len=args.ctx_len, batch_size=args.batch_size)
    want = args.epochs * tokens_per_epoch
    start, got = time.perf_counter(), 0
    for batch in loader:
        got += batch.targets.numel()
        if got >= want:
            break
    loader_rate = got / (time.perf_counter() - start)

    start = time.perf_counter()
    encoded = sum(len(ids) for ids in tokenizer.encode(docs, num_threads=1))
    encode_rate = encoded / (time.perf_counter() - start)

    print(f"shards: {len(urls)} train shards, {tokens_per_epoch:,} tokens per epoch; ctx {args.ctx_len}, batch {args.batch_size}")
    print(f"raw webdataset read        {raw_rate / 1e6:8.1f} M tokens/s")
    print(f"rwkv_dist loader           {loader_rate / 1e6:8.1f} M tokens/s  (stream + sha256 + unpack + pack)")
    print(f"ratio loader / raw         {loader_rate / raw_rate:8.2f}x")
    print(f"sentencepiece encode       {encode_rate / 1e6:8.2f} M tokens/s  (1 thread, {len(docs)} documents)")


if __name__ == "__main__":
    main()
