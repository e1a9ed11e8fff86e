"""Bad or unusual input to every subcommand: one line naming the file, field or value, before any work, and nothing
already on disk lost. Most cases run the CLI's main() in this process (the data commands never import torch); the
ones that reach the trainer run it in a subprocess."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers import run_cli

from rwkv_dist.cli import main


def fails(capsys, argv, needle: str) -> str:
    """main(argv) exits 2 with one stderr line holding `needle` (argparse's own errors add a usage block first)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse: a bad value of an option
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and needle in err, err
    assert err.splitlines()[-1].startswith("rwkv-dist") and needle in err.splitlines()[-1], err
    return err


def one_line(result, needle: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few hundred varied lines of ASCII text (enough pieces for a 300-token tokenizer) and the tokenizer."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(300)]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400))
    (folder / "corpus.txt").write_text(text)
    assert main(["data", "tokenizer", "--input", str(folder / "corpus.txt"), "--vocab-size", "300",
                 "--out", str(folder / "tok")]) == 0
    return folder


RUN_CONFIG = """\
model: {n_layer: 1, n_embd: 8, vocab_size: 300, ctx_len: 8}
data: {sources: [{location: DATA}]}
optimizer: {lr_init: 1.0e-3, lr_final: 1.0e-4}
schedule: {steps: 1, global_batch_size: 1, micro_batch_size: 1}
"""


@pytest.mark.parametrize("argv, needle", [
    (["plan", "CFG", "--gpus", "8", "--tensor", "0"], "--tensor must be positive, got 0"),  # was ZeroDivisionError
    (["plan", "CFG", "--gpus", "8", "--pipeline", "0"], "--pipeline must be positive, got 0"),
    (["plan", "CFG", "--gpus", "8", "--rows", "0"], "--rows must be positive, got 0"),  # was IndexError
    (["plan", "CFG", "--gpus", "8", "--gpu-mem", "0"], "--gpu-mem must be positive, got 0"),  # was the default
    (["plan", "CFG", "--gpus", "8", "--gpu-mem", "inf"], "--gpu-mem must be finite, got inf"),
    (["generate", "RUN", "--prompt", "a", "--temperature", "inf"], "--temperature must be finite, got inf"),
    (["sweep-fit", "R.csv", "--budgets", "1e20", "0"], "--budgets must be positive, got 0"),  # was ValueError
    (["sweep-fit", "R.csv", "--bootstrap", "-3"], "--bootstrap must be non-negative, got -3"),  # was taken as 0
    (["data", "tokenizer", "--input", "x", "--vocab-size", "300", "--out", "o", "--seed", "-1"],
     "--seed must be non-negative, got -1"),  # sentencepiece raised
    (["data", "tokenizer", "--input", "x", "--vocab-size", "300", "--out", "o", "--input-sentence-size", "-1"],
     "--input-sentence-size must be positive, got -1"),
    (["data", "shards", "--tokenizer", "t", "--input", "x", "--out", "o", "--workers", "-3"],
     "--workers must be positive, got -3"),  # was accepted
])
def test_bad_numbers_are_refused_by_the_parser(capsys, argv, needle):
    fails(capsys, argv, needle)


@pytest.mark.parametrize("override, needle", [
    ("optimizer.lr_init=.inf", "optimizer.lr_init: Input should be a finite number (got inf)"),  # was a math error
    ("data.sources=[{location: x, weight: .inf}]", "data.sources.0.weight: Input should be a finite number"),
    ("out_dir=", "out_dir: String should have at least 1 character"),  # would have trained into the working dir
    ("schedule.steps=true", "schedule.steps: expected a number, got true"),  # was read as 1 step
])
def test_bad_run_config_values(capsys, tmp_path, override, needle):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(RUN_CONFIG.replace("DATA", str(tmp_path)))
    # the override after --resume is an override too (argparse alone called it "unrecognized")
    fails(capsys, ["train", cfg, "--resume", "none", override], f"{cfg}: {needle}")


def test_config_files_that_are_not_yaml_text_or_loop(capsys, tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"model:\x91\xff\x00")
    fails(capsys, ["info", binary], f"{binary}: not a UTF-8 text file")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    fails(capsys, ["plan", a, "--gpus", "1"], "a cycle of base: files")  # was RecursionError


def test_info_takes_a_run_config(capsys, repo):
    assert main(["info", str(repo / "configs/train/rwkv4-169m.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == 169_342_464


def test_train_out_dir_below_a_file(tmp_path):
    (tmp_path / "file").write_text("keep")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(RUN_CONFIG.replace("DATA", str(tmp_path)))
    one_line(run_cli("train", cfg, f"out_dir={tmp_path / 'file' / 'run'}"),
             f"out_dir: {tmp_path / 'file'} exists and is not a folder")  # was NotADirectoryError from mkdir


def test_tokenizer_outputs_and_inputs(capsys, corpus, tmp_path):
    text = str(corpus / "corpus.txt")
    (tmp_path / "file").write_text("keep")
    fails(capsys, ["data", "tokenizer", "--input", text, "--vocab-size", "300", "--out", tmp_path / "file"],
          "exists and is not a folder")  # was FileExistsError
    assert (tmp_path / "file").read_text() == "keep"
    fails(capsys, ["data", "tokenizer", "--input", corpus, "--vocab-size", "300", "--out", tmp_path / "t"],
          f"{corpus}: is a folder; pass its files or a glob")  # said "no such file"
    many = tmp_path / "cjk.txt"
    many.write_text("".join(chr(0x4E00 + i) for i in range(400)))
    fails(capsys, ["data", "tokenizer", "--input", many, "--vocab-size", "300", "--out", tmp_path / "t"],
          "--vocab-size 300 is too small for this corpus: its characters, with the reserved and byte pieces, "
          "need 662")  # sentencepiece's message named a flag this command does not have
    assert not (tmp_path / "t").exists()  # a failed training leaves no empty folder


def test_shards_never_write_into_a_folder_of_other_files(capsys, corpus, tmp_path):
    tok, text = corpus / "tok", corpus / "corpus.txt"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    fails(capsys, ["data", "shards", "--tokenizer", tok, "--input", text, "--out", other],
          f"{other}: not empty and not a dataset being prepared (holds mine.txt)")
    assert sorted(p.name for p in other.iterdir()) == ["mine.txt"]
    fails(capsys, ["data", "shards", "--tokenizer", tok, "--input", text, "--out", other / "mine.txt"],
          "exists and is not a folder")  # was FileExistsError


def test_shards_of_unusual_jsonl(capsys, corpus, tmp_path):
    tok = corpus / "tok"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text"}\n{"text": 5}\n')
    err = fails(capsys, ["data", "shards", "--tokenizer", tok, "--input", bad, "--out", tmp_path / "d1",
                         "--on-bad-input", "skip"], "no non-empty documents")
    assert "2 lines without text" in err and f"{bad}:1: no text field 'text'" in err  # what was skipped
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "hello world"}\n{"text": "again"}\n')
    assert main(["data", "shards", "--tokenizer", str(tok), "--input", str(bom), "--out", str(tmp_path / "d2")]) == 0
    manifest = json.loads((tmp_path / "d2" / "manifest.json").read_text())
    assert manifest["stats"]["documents"] == 2 and manifest["stats"]["invalid_json_lines"] == 0
    capsys.readouterr()

    # a manifest from elsewhere: a shard name that would run a command under a pipe: location, or leave the folder
    entry = manifest["splits"]["train"][0]
    for name in ("x.tar; touch pwned", "../../etc/passwd"):
        (tmp_path / "d2" / "manifest.json").write_text(json.dumps(
            {**manifest, "splits": {"train": [{**entry, "file": name}], "val": []}}))
        fails(capsys, ["data", "verify", tmp_path / "d2"], "not a valid manifest (splits.train.0.file: String should")
    (tmp_path / "d2" / "manifest.json").write_text(json.dumps({**manifest, "splits": {"train": [], "val": []}}))
    fails(capsys, ["data", "verify", tmp_path / "d2"], "the manifest lists no shards")  # said "all 0 shards match"
    (tmp_path / "d2" / "manifest.json").write_bytes(b"\x91\xff{")
    fails(capsys, ["data", "verify", tmp_path / "d2"], "not a valid manifest (")  # was UnicodeDecodeError


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torch

    from rwkv_dist.model import RWKV, RWKVConfig

    path = tmp_path_factory.mktemp("weights") / "w.pth"
    torch.save(RWKV(RWKVConfig(n_layer=1, n_embd=8, vocab_size=300, ctx_len=8)).state_dict(), path)
    return path


def test_export_never_replaces_what_is_not_an_export(capsys, weights, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep")
    fails(capsys, ["export", weights, "--format", "hf", "--out", notes], "a folder that is not an hf export")
    assert (notes / "mine.txt").read_text() == "keep"  # was deleted with the folder
    file = tmp_path / "file.txt"
    file.write_text("keep")
    fails(capsys, ["export", weights, "--format", "hf", "--out", file], "exists and is not a folder")
    assert file.read_text() == "keep"  # was deleted
    fails(capsys, ["export", weights, "--format", "blinkdl", "--out", notes], "is a folder")  # was IsADirectoryError
    fails(capsys, ["export", weights, "--format", "blinkdl", "--out", tmp_path / "w.safetensors"],
          "a blinkdl export is a torch .pth file")  # wrote a pickle named .safetensors
    fails(capsys, ["export", weights, "--format", "blinkdl", "--out", file / "w.pth"], "exists and is not a folder")
    assert main(["export", str(weights), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", str(weights), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0  # an export: replaced


def _fake_checkpoint(run, data, tmp_path):
    """A committed step folder as the trainer lays it out, with a valid run config and a file that is not a pickle."""
    import yaml

    from rwkv_dist.config import load_run_config

    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(RUN_CONFIG.replace("DATA", str(data)) + f"out_dir: {run}\n")
    step = run / "checkpoints" / "step_00000001"
    (step / "trainer").mkdir(parents=True)
    (step / "config.yaml").write_text(yaml.safe_dump(load_run_config(cfg_path).model_dump(mode="json")))
    (step / "COMPLETE.json").write_text(json.dumps({"format": "rwkv_dist.checkpoint/1", "step": 1, "world_size": 1}))
    (step / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 cut short")
    return cfg_path, step


def test_damaged_checkpoints(capsys, corpus, tmp_path):
    from rwkv_dist.errors import CheckpointError
    from rwkv_dist.train.checkpoint import read_rank_rng

    assert main(["data", "shards", "--tokenizer", str(corpus / "tok"), "--input", str(corpus / "corpus.txt"),
                 "--out", str(tmp_path / "data")]) == 0
    cfg, step = _fake_checkpoint(tmp_path / "run", tmp_path / "data", tmp_path)
    fails(capsys, ["export", step, "--format", "blinkdl", "--out", tmp_path / "w.pth"],
          "mp_rank_00_model_states.pt: unreadable, truncated or damaged (")  # said "not weights-only"
    (step / "trainer" / "rank_00000.rng.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="rank_00000.rng.safetensors: unreadable RNG state"):
        read_rank_rng(step, 0)  # was safetensors' own error, a traceback mid-resume
    (step / "config.yaml").write_text("model: [\n")
    one_line(run_cli("train", cfg, "--resume", step), f"{step / 'config.yaml'}: unreadable run config")


def test_sweep_status_of_damaged_files(capsys, tmp_path):
    run = tmp_path / "r1"
    run.mkdir()
    (tmp_path / "plan.json").write_text("{")
    fails(capsys, ["sweep-status", tmp_path], f"{tmp_path / 'plan.json'}: unreadable (JSONDecodeError")
    (tmp_path / "plan.json").write_text("[]")
    fails(capsys, ["sweep-status", tmp_path], "not a sweep plan")
    (tmp_path / "plan.json").write_text(json.dumps({"runs": [{"name": "r1", "n_layer": 1, "n_embd": 8, "lr": 1e-3,
                                                              "tokens": 100, "overrides": [], "out_dir": str(run),
                                                              "steps": 10}]}))
    (tmp_path / "driver.json").write_text('{"pid": 1}')
    fails(capsys, ["sweep-status", tmp_path], "driver.json: not a sweep driver record")
    (tmp_path / "driver.json").unlink()
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 3.5}\n{"step": "x", "loss": "nan"}\n')
    assert main(["sweep-status", str(tmp_path)]) == 0  # the foreign line is skipped, not formatted as a number
    assert "3.5000" in capsys.readouterr().out


def test_sweep_fit_out_is_a_file(capsys, tmp_path):
    (tmp_path / "results.csv").write_text("run,params,tokens,flops,train_loss,val_loss,status\n")
    (tmp_path / "fit").write_text("keep")
    fails(capsys, ["sweep-fit", tmp_path], f"--out: {tmp_path / 'fit'} exists and is not a folder")


def test_out_of_memory_is_one_line():
    import torch

    from rwkv_dist.cli import _out_of_memory

    with pytest.raises(RuntimeError) as caught:
        torch.empty(1 << 60, dtype=torch.uint8)  # what ctx_len=10^8 or vocab_size=10^11 does to the trainer
    message = _out_of_memory(caught.value)
    assert message is not None and message.startswith("out of memory (") and "\n" not in message
    assert _out_of_memory(RuntimeError("a bug")) is None  # every other RuntimeError keeps its traceback


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("kind, needle", [
    ("code", "refused to load, not weights-only (Unsupported global: GLOBAL print)"),
    ("truncated", "unreadable, truncated or damaged (RuntimeError: PytorchStreamReader"),
])
def test_pth_files_that_are_not_weights(capsys, tmp_path, kind, needle):
    """A .pth that would run code when unpickled, or one cut short: one line saying which, never torch's advice to
    retry with weights_only=False (which would run it)."""
    import torch

    path = tmp_path / "w.pth"
    if kind == "code":
        torch.save({"emb.weight": _RunsCode()}, path)
    else:
        torch.save({"emb.weight": torch.zeros(4, 4)}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    err = fails(capsys, ["export", path, "--format", "blinkdl", "--out", tmp_path / "out.pth"], needle)
    assert "weights_only" not in err and "this must never run" not in err
    assert not (tmp_path / "out.pth").exists()


def test_model_numbers_must_be_finite(capsys, tmp_path):
    (tmp_path / "m.yaml").write_text("model: {n_layer: 1, n_embd: 8, vocab_size: 300, layer_norm_eps: .inf}\n")
    fails(capsys, ["info", tmp_path / "m.yaml"], "layer_norm_eps: Input should be a finite number")


def test_a_corpus_of_long_lines_trains_a_tokenizer(tmp_path):
    """sentencepiece skips every line over its max_sentence_length: a corpus of unwrapped paragraphs used to fail with
    "sentencepiece failed: " (an empty reason). Long lines are cut into parts, at spaces where there are any, that
    join back to the line; and the tokenizer trained on them round-trips the text."""
    from rwkv_dist.data import Tokenizer
    from rwkv_dist.data.tokenizer import MAX_LINE_BYTES, _short_parts

    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(400)]
    paragraphs = [" ".join(rng.choice(words) for _ in range(4000)) for _ in range(20)]  # ~20k characters each
    for line in (paragraphs[0], "x" * 50_000, "é" * 9000):  # with spaces, without, and 2-byte characters
        parts = list(_short_parts(line))
        assert "".join(parts) == line and len(parts) > 1
        assert all(len(p.encode()) <= MAX_LINE_BYTES for p in parts)
    (tmp_path / "long.txt").write_text("\n\n".join(paragraphs))
    assert main(["data", "tokenizer", "--input", str(tmp_path / "long.txt"), "--vocab-size", "400",
                 "--out", str(tmp_path / "tok")]) == 0
    tokenizer = Tokenizer(tmp_path / "tok")
    text = paragraphs[3][:2000]
    assert tokenizer.decode(tokenizer.encode([text])[0]) == text


def test_compressed_corpora_and_containers(capsys, tmp_path):
    """JSONL and text compressed with gzip, bzip2, xz or zstd (.jsonl.zst is how most pretraining corpora ship) read as
    the same documents as uncompressed; a damaged one is named in one line; an archive or a columnar file is refused
    by name: read as text it was bytes of garbage, counted only as 'invalid UTF-8'."""
    import bz2
    import gzip
    import lzma

    import zstandard

    from rwkv_dist.data.corpus import CorpusStats, expand_inputs, read_documents

    records = [{"text": f"document {i}: " + "lorem ipsum " * i} for i in range(1, 40)]
    plain = "".join(json.dumps(r) + "\n" for r in records).encode()
    compress = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress,
                "zst": zstandard.ZstdCompressor().compress}
    want = [r["text"] for r in records]
    for suffix, pack in compress.items():
        for name in (f"c.jsonl.{suffix}", f"c.ndjson.{suffix}"):
            (tmp_path / name).write_bytes(pack(plain))
            stats = CorpusStats()
            assert list(read_documents(expand_inputs([str(tmp_path / name)]), stats=stats)) == want, name
            assert stats.invalid_utf8 == 0
        (tmp_path / f"t.txt.{suffix}").write_bytes(pack(b"one text document\nof two lines\n"))
        assert list(read_documents([tmp_path / f"t.txt.{suffix}"])) == ["one text document\nof two lines\n"]
        (tmp_path / f"bad.jsonl.{suffix}").write_bytes(b"never compressed")
        fails(capsys, ["data", "tokenizer", "--input", tmp_path / f"bad.jsonl.{suffix}", "--vocab-size", "300",
                       "--out", tmp_path / "tok"], f"bad.jsonl.{suffix}: cannot read (")
    for name in ("docs.parquet", "docs.zip", "docs.tar"):
        (tmp_path / name).write_bytes(b"PAR1")
        fails(capsys, ["data", "tokenizer", "--input", tmp_path / name, "--vocab-size", "300", "--out",
                       tmp_path / "tok"], f"{name}: a {Path(name).suffix} file is not text or JSONL")
    assert not (tmp_path / "tok").exists()
