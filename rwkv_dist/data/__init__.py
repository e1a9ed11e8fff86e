"""Data: text corpora -> sentencepiece tokenizer -> WebDataset shards + manifest -> streaming, resumable loader."""

from .corpus import BUILTIN, CorpusStats, expand_inputs, read_documents
from .shards import Manifest, load_manifest, verify, write_shards
from .stream import Batch, Source, TokenLoader, validation_batches
from .tokenizer import EOD_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer

__all__ = [
    "BUILTIN", "CorpusStats", "expand_inputs", "read_documents", "Manifest", "load_manifest", "verify", "write_shards",
    "Batch", "Source", "TokenLoader", "validation_batches", "EOD_ID", "PAD_ID", "UNK_ID", "Tokenizer", "train_tokenizer",
]
