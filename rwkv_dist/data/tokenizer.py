"""sentencepiece tokenizer: trained on the user's text, lossless (decode(encode(x)) == x for any Unicode text).

Reserved ids (fixed for every tokenizer this project trains):
    0  <|endoftext|>  end of document: separates documents when they are packed into training windows
    1  <pad>          padding (packing never pads; kept for users who batch ragged data)
    2  <unk>          never produced: byte fallback spells any unseen character as its UTF-8 bytes
    3, 4, 5           "\\n", "\\r", "\\t" as single tokens (sentencepiece would otherwise spend a byte token on each)
Lossless because: no normalization (identity rule), no whitespace collapsing, no dummy prefix, byte fallback.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from ..errors import DataError, check_out_folder

EOD_ID, PAD_ID, UNK_ID = 0, 1, 2
CONTROL_SYMBOLS = ["\n", "\r", "\t"]
MODEL_FILE = "tokenizer.model"


def train_tokenizer(documents: Iterable[str], out_dir: str | Path, vocab_size: int, model_type: str = "bpe",
                    input_sentence_size: int = 2_000_000, seed_sentencepiece_size: int = 1_000_000,
                    num_threads: int = 2, seed: int = 0) -> Path:
    """Train on `documents` (split into lines: sentencepiece learns from sentences) and write out_dir/tokenizer.model.

    input_sentence_size samples that many lines (sentencepiece's own reservoir sampling) so huge corpora train fast;
    `seed` fixes that sampling (sentencepiece draws a fresh seed per process otherwise)."""
    check_tokenizer_args(out_dir, vocab_size, model_type)
    if seed < 0:
        raise DataError(f"tokenizer: --seed must be non-negative, got {seed}")
    out_dir = Path(out_dir)
    model = io.BytesIO()
    lines = _lines(documents)
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            user_defined_symbols=CONTROL_SYMBOLS, eos_id=EOD_ID, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1,
            eos_piece="<|endoftext|>", pad_piece="<pad>", unk_piece="<unk>", character_coverage=0.9995,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentencepiece_size, max_sentence_length=MAX_LINE_BYTES, num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        if lines.count == 0:
            raise DataError("tokenizer: the corpus has no text") from None
        msg = str(e).split("] ", 1)[-1].strip()
        if "Vocabulary size too high" in msg:
            raise DataError(f"tokenizer: the corpus supports at most a smaller vocabulary: {msg}") from None
        if "smaller than required_chars" in msg:  # sentencepiece's advice names a flag this command does not have
            chars = msg.split(" vs ")[-1].split(".")[0]
            raise DataError(f"tokenizer: --vocab-size {vocab_size} is too small for this corpus: its characters, with "
                            f"the reserved and byte pieces, need {chars} ids; use a larger --vocab-size") from None
        raise DataError(f"tokenizer: sentencepiece failed: {msg}") from None
    if lines.count == 0:
        raise DataError("tokenizer: the corpus has no text")
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a failed training leaves no empty folder behind
    path = out_dir / MODEL_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(path)
    return path


def check_tokenizer_args(out_dir: str | Path, vocab_size: int, model_type: str) -> None:
    """What `data tokenizer` can refuse before reading any input (sampling a corpus takes minutes)."""
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"tokenizer: unknown model type {model_type!r} (bpe, unigram)")
    least = 256 + 3 + len(CONTROL_SYMBOLS) + 1  # byte pieces, reserved ids, control symbols, one learned piece
    if vocab_size < least:
        raise DataError(f"tokenizer: vocab size {vocab_size} is too small: byte fallback, the reserved ids and "
                        f"\\n \\r \\t take 262, the smallest is {least}")
    check_out_folder(out_dir, "tokenizer: --out", DataError)


MAX_LINE_BYTES = 16384  # sentencepiece's max_sentence_length: longer lines are cut into parts (_short_parts)


class _Lines:
    """Documents -> non-empty lines, counting them (sentencepiece takes an iterator)."""

    def __init__(self, documents: Iterable[str]):
        self._docs = iter(documents)
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for doc in self._docs:
            for line in doc.split("\n"):
                if line:
                    for part in _short_parts(line):
                        self.count += 1
                        yield part


def _short_parts(line: str) -> Iterator[str]:
    """A line as parts sentencepiece takes whole: it skips every sentence over max_sentence_length bytes without a
    word, so a corpus of long lines (unwrapped paragraphs, minified text) would train on a fraction of its text, or
    on none and fail. Parts are at most MAX_LINE_BYTES // 4 characters (hence bytes), cut after a space if there is one
    in the part's second half."""
    if len(line) <= MAX_LINE_BYTES // 4 or len(line.encode()) <= MAX_LINE_BYTES:
        yield line
        return
    most = MAX_LINE_BYTES // 4
    while len(line) > most:
        cut = line.rfind(" ", most // 2, most) + 1 or most
        yield line[:cut]
        line = line[cut:]
    if line:
        yield line


def _lines(documents: Iterable[str]) -> _Lines:
    return _Lines(documents)


class Tokenizer:
    """A trained sentencepiece model with the reserved ids above."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / MODEL_FILE
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such tokenizer model")
        data = self.path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except RuntimeError:
            raise DataError(f"{self.path}: not a sentencepiece model") from None
        if self.sp.eos_id() != EOD_ID or self.sp.id_to_piece(EOD_ID) != "<|endoftext|>":
            raise DataError(f"{self.path}: id {EOD_ID} is not <|endoftext|>; train tokenizers with `rwkv-dist data tokenizer`")

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def eod_id(self) -> int:
        return EOD_ID

    def encode(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))
