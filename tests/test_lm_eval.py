"""Downstream evaluation: the HF export's tokenizer, the lm-eval backend against lm-eval's own `hf` backend on the
export, state reuse, generation with stop sequences, the CLI and its one-line errors. Real lm-eval, offline tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rwkv_dist.data import BUILTIN, Tokenizer, expand_inputs, read_documents

from helpers import random_model, run_cli

AWKWARD = [
    "  Leading spaces\n\n\tTabs\tinside\r\nWindows line end\r\n"
    "emoji 😀🚀 and CJK 中文字符 plus unseen 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ\n    runs     of spaces   \n",
    "Tabs\there, CRLF\r\nemoji 😀🚀, CJK 中文字符, accents é ü ñ, math ∑∫, spaces   end\n",
    "", " ", "  ", " " * 37, "\t\t\r\n\r\n\n", "trailing space ", "x\u2581y  ▁▁ z", "\u3000ideographic\u00a0nbsp\u200bzwsp",
    "combining e\u0301 vs \u00e9, ligature ﬁ, fullwidth ＡＢＣ, Å vs Å", "NUL \x00 and DEL \x7f", "🏳️‍🌈 👨‍👩‍👧",
    "literal <|endoftext|> and <pad> and <unk> and <0x41> in text", "ends with CR\r", "日本語のテキストと한국어",
]


@pytest.fixture(scope="module")
def tokenizer(data) -> Tokenizer:
    return Tokenizer(Path(data) / "tokenizer.model")


@pytest.fixture(scope="module")
def replaced_text(tmp_path_factory) -> str:
    """A document whose invalid UTF-8 the corpus reader replaced (U+FFFD), as in the data tests."""
    folder = tmp_path_factory.mktemp("bad_utf8")
    (folder / "a.txt").write_bytes("valid text ".encode() * 3 + b"\xff\xfe broken \xc3( bytes \xe2\x82")
    (doc,) = read_documents([folder / "a.txt"])
    assert "\ufffd" in doc
    return doc


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tokenizer, tmp_path_factory) -> Path:
    """`rwkv-dist export --format hf --tokenizer` of a random model with the demo tokenizer's vocabulary."""
    folder = tmp_path_factory.mktemp("hf_tok")
    torch.save(random_model(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=16).state_dict(), folder / "m.pth")
    done = run_cli("export", folder / "m.pth", "--format", "hf", "--out", folder / "hf", "--tokenizer", tokenizer.path)
    assert done.returncode == 0, done.stderr
    assert "with its tokenizer" in done.stdout
    return folder / "hf"


def test_hf_export_tokenizer_encodes_and_decodes_as_ours(tokenizer, hf_tokenizer_dir, replaced_text):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    assert (hf.eos_token_id, hf.pad_token_id, hf.unk_token_id, hf.bos_token_id) == (0, 1, 2, None)
    assert len(hf) == tokenizer.vocab_size and [hf.convert_tokens_to_ids(c) for c in "\n\r\t"] == [3, 4, 5]
    texts = AWKWARD + [replaced_text]
    for text in texts:
        ids = tokenizer.encode([text])[0]
        assert hf.encode(text) == ids, text
        assert hf(text)["input_ids"] == ids, text  # the call lm-eval's hf backend batches through
        assert hf.decode(ids) == tokenizer.decode(ids) == text.replace("\u2581", " "), text
    assert hf(texts)["input_ids"] == tokenizer.encode(texts)
    # the reserved ids decode to nothing, as sentencepiece's control pieces do, and are never produced from text
    mixed = [0] + tokenizer.encode(["a b"])[0] + [0, 1]
    assert hf.decode(mixed, skip_special_tokens=True) == tokenizer.decode(mixed) == "a b"
    assert 0 not in hf.encode("<|endoftext|>")
    # byte tokens: a lone UTF-8 lead byte is replaced when decoded, as sentencepiece does
    lone = [tokenizer.sp.piece_to_id("<0xE2>")] + tokenizer.encode(["ok"])[0]
    assert hf.decode(lone) == tokenizer.decode(lone)


def test_hf_export_tokenizer_equals_ours_on_the_demo_corpus(tokenizer, hf_tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    docs = list(read_documents(expand_inputs([BUILTIN])))
    assert sum(map(len, docs)) > 3_000_000
    ours = tokenizer.encode(docs, num_threads=2)
    theirs = hf(docs)["input_ids"]
    mismatched = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert not mismatched, f"{len(mismatched)} of {len(docs)} documents tokenized differently"
    assert all(hf.decode(ids) == tokenizer.decode(ids) for ids in ours[::8])


def test_hf_export_refuses_a_tokenizer_larger_than_the_model(tokenizer, tmp_path):
    torch.save(random_model(vocab_size=300, n_layer=1, n_embd=16).state_dict(), tmp_path / "m.pth")
    done = run_cli("export", tmp_path / "m.pth", "--format", "hf", "--out", tmp_path / "hf", "--tokenizer",
                   tokenizer.path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "2048 tokens, more than the model's 300" in done.stderr
    assert not (tmp_path / "hf").exists()


def test_hf_export_tokenizer_decodes_generated_ids_as_ours(tokenizer, hf_tokenizer_dir):
    """Ids no text encodes to (as a model may generate them): ASCII byte pieces among ordinary pieces."""
    import random

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    sp, rng = tokenizer.sp, random.Random(0)
    ascii_bytes = [sp.piece_to_id(f"<0x{b:02X}>") for b in range(128)]
    plain = [i for i in range(6, tokenizer.vocab_size) if not sp.is_byte(i)]
    for _ in range(300):
        ids = [rng.choice(ascii_bytes if rng.random() < 0.4 else plain) for _ in range(rng.randint(1, 24))]
        assert hf.decode(ids) == tokenizer.decode(ids), ids
    invalid_then_ascii = [sp.piece_to_id("<0xE2>"), sp.piece_to_id("<0x82>"), sp.piece_to_id("<0x32>")]
    assert hf.decode(invalid_then_ascii) == tokenizer.decode(invalid_then_ascii) == "\ufffd\ufffd2"
