"""Data: text corpora -> sentencepiece tokenizer -> WebDataset shards + manifest -> streaming, resumable loader.

Names are imported on first use (PEP 562): preparing data, the data commands and every Ray prep task then import
neither torch nor webdataset (seconds per process); only the loader (stream.py) and shard reading/writing need them."""

from importlib import import_module

_HOME = {
    "BUILTIN": "corpus", "CorpusStats": "corpus", "expand_inputs": "corpus", "read_documents": "corpus",
    "Manifest": "shards", "load_manifest": "shards", "verify": "shards", "write_shards": "shards",
    "Batch": "stream", "Source": "stream", "TokenLoader": "stream", "validation_batches": "stream",
    "EOD_ID": "tokenizer", "PAD_ID": "tokenizer", "UNK_ID": "tokenizer", "Tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value
