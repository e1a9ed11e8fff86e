"""Downstream evaluation: the HF export's tokenizer, the lm-eval backend against lm-eval's own `hf` backend on the
export, state reuse, generation with stop sequences, the CLI and its one-line errors. Real lm-eval, offline tasks."""

from __future__ import annotations

import os
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


# ---- the lm-eval backend ------------------------------------------------------------------------------------------

TASKS = Path(__file__).with_name("lm_eval_tasks")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch, repo):
    monkeypatch.chdir(repo)  # the local tasks' data_files are relative to the repository root, as lm-eval reads them


@pytest.fixture(scope="module")
def trained(runs) -> Path:
    """A trained test checkpoint: the 1-process ZeRO-3 run of the shared training fixtures (2 layers, D64, V2048)."""
    return runs["one"]


@pytest.fixture(scope="module")
def trained_hf(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained_hf") / "hf"
    done = run_cli("export", trained, "--format", "hf", "--out", out)
    assert done.returncode == 0 and "with its tokenizer" in done.stdout, done.stdout + done.stderr
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer.model").is_file()
    return out


def ours(checkpoint, **kw):
    from rwkv_dist.evaluation.backend import RWKVDistLM

    return RWKVDistLM(pretrained=str(checkpoint), device="cpu", **{"batch_size": 4, "chunk_len": 16, **kw})


def evaluate(lm, tasks, **kw) -> dict:
    from rwkv_dist.evaluation.harness import run_tasks

    return run_tasks(lm, tasks, include_path=[TASKS], log_samples=True, bootstrap_iters=0, **kw)


def scores(results: dict, task: str) -> list[float]:
    """Every request's log-likelihood, in lm-eval's document order."""
    out = []
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        for resp in sample["resps"]:
            out.append(float(resp[0][0] if isinstance(resp[0], (tuple, list)) else resp[0]))
    return out


def metrics(results: dict, task: str) -> dict:
    return {k: v for k, v in results["results"][task].items() if k.endswith(",none") and "stderr" not in k}


# lm-eval's own `hf` backend (transformers' RwkvForCausalLM) on the HF export of the trained checkpoint, three ways:
#   fp32       its defaults for an fp32 model: log-softmax, and the sum over a continuation's tokens, in float32
#   fp32_sum64 the same fp32 model with lm-eval's softmax_dtype=float64: log-softmax and sum in float64
#   fp64       the whole model in float64: the exact value the fp32 backends approximate
HF_KINDS = {"fp32": {"dtype": "float32"}, "fp32_sum64": {"dtype": "float32", "softmax_dtype": "float64"},
            "fp64": {"dtype": "float64"}}


@pytest.fixture(scope="module")
def hf_results(trained_hf) -> dict:
    """{kind: {"mc" | "ppl": lm-eval's results}} of lm-eval's hf backend on the export (HF_KINDS)."""
    from lm_eval.models.huggingface import HFLM

    out = {}
    for kind, dtypes in HF_KINDS.items():
        hf = HFLM(pretrained=str(trained_hf), device="cpu", batch_size=4, max_length=2048, **dtypes)
        out[kind] = {"mc": evaluate(hf, ["rwkv_dist_mc"], num_fewshot=2), "ppl": evaluate(hf, ["rwkv_dist_ppl"])}
    return out


@pytest.fixture(scope="module")
def our_results(trained) -> dict:
    """Our backend on the same tasks: {"mc" | "ppl": (the LM, its token counts, the results)}."""
    out = {}
    for task, fewshot in (("mc", 2), ("ppl", None)):
        lm = ours(trained)
        out[task] = (lm, dict(lm.stats), evaluate(lm, [f"rwkv_dist_{task}"], num_fewshot=fewshot))
        out[task][1].update(lm.stats)
    return out


def test_loglikelihoods_equal_lm_evals_hf_backend_on_the_export(our_results, hf_results):
    """Every request's log-likelihood within 1e-4 of lm-eval's hf backend on the fp32 export, metrics identical.

    The perplexity documents are whole sums over ~90-200 tokens (|sum| ~ 1000, where a float32 ulp is 6e-5). lm-eval's
    hf backend sums a continuation's fp32 log-probs in float32 (`float(logits.sum())` in HFLM._loglikelihood_tokens);
    that rounding alone moves a document's sum by up to ~1e-4 from the float64 sum of the very same log-probs, while
    ours sums in float64. So the per-request 1e-4 is asserted against the hf backend with its log-softmax and sum in
    float64 (softmax_dtype, the model still fp32) and against the hf backend in float64; the hf defaults are held to
    1e-4 on the multiple-choice requests (a few tokens each) and to identical metrics on both tasks; and ours is
    closer to the float64 value than the hf defaults are."""
    error = {"ours": 0.0, "fp32": 0.0}  # worst distance from the float64 reference, over both tasks
    for task in ("mc", "ppl"):
        got, name = our_results[task][2], f"rwkv_dist_{task}"
        a = scores(got, name)
        ref = {kind: scores(results[task], name) for kind, results in hf_results.items()}
        assert len(a) == (96 if task == "mc" else 8) and all(len(r) == len(a) for r in ref.values())
        for kind in ("fp32_sum64", "fp64") + (("fp32",) if task == "mc" else ()):
            worst = max(abs(x - y) for x, y in zip(a, ref[kind]))
            assert worst < 1e-4, (task, kind, worst)
        error["ours"] = max(error["ours"], *(abs(x - y) for x, y in zip(a, ref["fp64"])))
        error["fp32"] = max(error["fp32"], *(abs(x - y) for x, y in zip(ref["fp32"], ref["fp64"])))
        for kind, results in hf_results.items():
            assert metrics(got, name) == pytest.approx(metrics(results[task], name), rel=1e-6), kind
            # the prompts lm-eval built are the same for both backends
            prompts = [[s["arguments"] for s in r["samples"][name]] for r in (got, results[task])]
            assert prompts[0] == prompts[1], kind
            if task == "mc":
                assert metrics(got, name) == metrics(results[task], name)  # counts of correct answers: equal
    assert error["ours"] < error["fp32"], error
    ppl = metrics(our_results["ppl"][2], "rwkv_dist_ppl")
    assert 1 < ppl["byte_perplexity,none"] < 256 and ppl["bits_per_byte,none"] > 0


def test_each_context_runs_once_for_all_its_choices(our_results):
    """State reuse: a 4-choice question costs one pass over its (2-shot) context, not four."""
    lm, stats, results = our_results["mc"]
    contexts = {s["doc_id"]: s["arguments"][0][0] for s in results["samples"]["rwkv_dist_mc"]}
    assert all(len(s["arguments"]) == 4 for s in results["samples"]["rwkv_dist_mc"])
    context_tokens = sum(len(lm.tok_encode(c)) for c in contexts.values())
    assert context_tokens > 24 * 60  # 2-shot contexts: the cost that matters
    assert stats["context"] <= 1.3 * context_tokens, (stats, context_tokens)
    assert stats["context"] == context_tokens  # every context exactly once
    assert stats["continuation"] < context_tokens / 2
    # whole documents stream through the state: one token in per token scored
    lm, stats, results = our_results["ppl"]
    docs = [s["doc"]["text"] for s in results["samples"]["rwkv_dist_ppl"]]
    assert stats["rolling"] == sum(len(lm.tok_encode(d)) for d in docs) and stats["context"] == 0


def greedy_reference(model, tokenizer, prompt: str, n: int) -> list[int]:
    ids, state, out = tokenizer.encode([prompt])[0], None, []
    with torch.no_grad():
        for token in ids:
            logits, state = model.step(torch.tensor([token]), state)
        for _ in range(n):
            out.append(int(logits[0].argmax()))
            logits, state = model.step(torch.tensor([out[-1]]), state)
    return out


def test_generate_until_is_greedy_decoding_cut_at_the_first_stop_sequence(trained):
    import subprocess
    import sys

    from lm_eval.api.instance import Instance

    from rwkv_dist.inference import load_model

    n, prompts = 24, ["def __init__(self", "import os\n", "class Error("]
    model, tokenizer = load_model(trained)
    tokens = {p: greedy_reference(model, tokenizer, p, n) for p in prompts}
    assert not any(tokenizer.eod_id in t for t in tokens.values())
    texts = {p: tokenizer.decode(t) for p, t in tokens.items()}
    # `rwkv-dist generate` with a nucleus of one token is greedy: the same text
    done = subprocess.run([sys.executable, "-m", "rwkv_dist.cli", "generate", str(trained), "--prompt", prompts[0],
                           "--max-tokens", str(n), "--top-p", "1e-9"], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.decode() == prompts[0] + texts[prompts[0]] + "\n"

    def request(prompt, until, max_gen=n):
        return Instance("generate_until", {}, (prompt, {"until": until, "max_gen_toks": max_gen, "do_sample": False}), 0)

    cases = []  # (request, expected text)
    for p, text in texts.items():
        early, late = text[3:6], text[12:15]
        cases += [(request(p, []), text), (request(p, ["\x07 not there"]), text),
                  (request(p, [early]), text[:text.index(early)]), (request(p, [late]), text[:text.index(late)]),
                  (request(p, [late, early]), text[:min(text.index(early), text.index(late))]),
                  (request(p, [], max_gen=5), tokenizer.decode(tokens[p][:5]))]
    lm = ours(trained, batch_size=3)
    got = lm.generate_until([r for r, _ in cases])
    assert got == [expected for _, expected in cases]
    assert lm.stats["context"] == sum(len(tokenizer.encode([r.args[0]])[0]) for r, _ in cases)


def test_lm_eval_cli_writes_lm_evals_results_json(trained, tmp_path):
    import json

    out = tmp_path / "out"
    done = run_cli("lm-eval", trained, "--tasks", "rwkv_dist_mc,rwkv_dist_ppl,rwkv_dist_gen", "--include-path", TASKS,
                   "--limit", 4, "--batch-size", 3, "--output-path", out, "--log-samples")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    assert f"wrote {results_file}" in done.stdout
    results = json.loads(results_file.read_text())
    assert set(results["results"]) == {"rwkv_dist_mc", "rwkv_dist_ppl", "rwkv_dist_gen"}
    assert results["n-samples"]["rwkv_dist_mc"]["effective"] == 4 and "config" in results and "versions" in results
    samples = [json.loads(line) for line in next(out.rglob("samples_rwkv_dist_mc_*.jsonl")).read_text().splitlines()]
    acc = sum(s["acc"] for s in samples) / len(samples)
    assert len(samples) == 4 and results["results"]["rwkv_dist_mc"]["acc,none"] == pytest.approx(acc)
    assert "rwkv_dist_gen" in done.stdout and "exact_match" in done.stdout  # lm-eval's table


def test_the_model_is_registered_with_lm_eval(trained):
    """What `lm_eval --model rwkv_dist --model_args pretrained=...` (python -m rwkv_dist.evaluation) does."""
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model

    from rwkv_dist.evaluation.backend import RWKVDistLM
    from rwkv_dist.evaluation.harness import task_manager

    assert get_model("rwkv_dist") is RWKVDistLM
    results = simple_evaluate(model="rwkv_dist", model_args=f"pretrained={trained},chunk_len=8", batch_size=2,
                              device="cuda", tasks=["rwkv_dist_ppl"], limit=2, bootstrap_iters=0,
                              task_manager=task_manager(["rwkv_dist_ppl"], [TASKS]))
    assert results["results"]["rwkv_dist_ppl"]["bits_per_byte,none"] > 0


@pytest.mark.parametrize("case", ["unknown task", "missing dataset", "paper suite offline", "vocabulary mismatch",
                                  "no tokenizer"])
def test_bad_lm_eval_input_is_one_line(case, trained, tokenizer, tmp_path, capsys):
    from rwkv_dist.cli import main

    small = tmp_path / "small.pth"
    torch.save(random_model(vocab_size=300, n_layer=1, n_embd=16).state_dict(), small)
    args, message = {
        "unknown task": ([trained, "--tasks", "rwkv_dist_mc,no_such_task"], "unknown task no_such_task: not in"),
        "missing dataset": ([trained, "--tasks", "rwkv_dist_missing"],
                            "task rwkv_dist_missing: its dataset is not on this machine: Unable to find"),
        "paper suite offline": ([trained, "--tasks", "rwkv-paper"],
                                "task arc_challenge: its dataset is not on this machine: Couldn't reach 'allenai/ai2_arc'"),
        "vocabulary mismatch": ([small, "--tasks", "rwkv_dist_mc", "--tokenizer", tokenizer.path],
                                "2048 tokens, more than the model's 300"),
        "no tokenizer": ([small, "--tasks", "rwkv_dist_mc"], "a weights file carries no tokenizer"),
    }[case]
    capsys.readouterr()
    assert main(["lm-eval", *map(str, args), "--include-path", str(TASKS)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rwkv-dist lm-eval: error: ") and message in err, err


def test_the_paper_preset_lists_lm_eval_tasks_beside_the_official_figures():
    from rwkv_dist.evaluation.harness import expand_tasks, paper_comparison, paper_suite, task_manager

    names = expand_tasks(["rwkv-paper", "piqa"])
    assert names == paper_suite()["tasks"] and len(names) == 12
    task_manager(names, [TASKS])  # every one is a task of lm-eval 0.4.13 (or this raises); index cached above
    official = paper_suite()["official"]
    assert len(official) == 6 and official["RWKV-4-Pile-14B-20230213-8019"]["lambada_openai"]["acc"] == 71.05
    table = paper_comparison({"results": {"lambada_openai": {"acc,none": 0.5, "perplexity,none": 12.0},
                                          "sciq": {"acc,none": 0.25, "acc_norm,none": 0.5}}})
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in table.splitlines()[1:-1]}
    assert rows[("lambada_openai", "acc")] == ["50.00", "32.99", "45.16", "56.43", "63.94", "67.18", "71.05"]
    assert rows[("lambada_openai", "perplexity")][:2] == ["12.00", "29.33"]
    assert rows[("sciq", "acc")] == ["25.00"] + ["-"] * 6  # no documented figure: shown as such, not invented


def test_sweep_runs_score_eval_tasks_as_results_columns(trained, data, repo, tmp_path):
    """A sweep with `eval:` runs `rwkv-dist lm-eval` on each finished run (inside its Ray task, after training) and
    its task metrics become columns of results.csv. Here: the sweep's own pieces on an already trained run."""
    import csv
    import json
    import shutil
    import sys

    import yaml

    from rwkv_dist.sweep.runner import RESULT, _eval_command, _execute, _summarize, load_sweep, run_sweep, write_table

    tiny_cpu = yaml.safe_load((repo / "configs" / "sweeps" / "tiny-cpu.yaml").read_text())
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "evals", "base": str(repo / "configs" / "demo.yaml"), "out_dir": str(tmp_path / "out"),
        "overrides": [o for o in tiny_cpu["overrides"] if not o.startswith("data.")] + [
            f"data.sources=[{{location: {data}}}]", f"data.val={data}", "model.ctx_len=32"],
        "grid": {"models": [{"n_layer": 2, "n_embd": 64}], "tokens": [4096]},
        "eval": {"tasks": ["rwkv_dist_mc"], "include_path": [str(TASKS)], "limit": 6, "batch_size": 3}}))
    lines: list[str] = []
    run_sweep(sweep_file, dry_run=True, echo=lines.append)
    assert any("then: -m rwkv_dist.cli lm-eval" in line and "--tasks rwkv_dist_mc" in line for line in lines), lines
    sweep, base, (run,) = load_sweep(sweep_file)
    shutil.copytree(trained, run.out_dir)  # as if its training had just finished
    code, _ = _execute([sys.executable, "-c", "pass"], str(repo), str(run.out_dir / "train.log"),
                       _eval_command(sweep, sweep_file.parent, run))
    assert code == 0, (run.out_dir / "eval.log").read_text()[-3000:]
    row = _summarize(base, run, code, 1.0, evaluated=True)
    assert row["status"] == "done" and 0 <= row["rwkv_dist_mc/acc"] <= 1 and "rwkv_dist_mc/acc_norm" in row
    (run.out_dir / RESULT).write_text(json.dumps(row) + "\n")  # what run_sweep keeps per finished run
    with open(write_table(Path(sweep.out_dir), [run])) as f:
        (written,) = list(csv.DictReader(f))
    assert float(written["rwkv_dist_mc/acc"]) == pytest.approx(row["rwkv_dist_mc/acc"]) and written["train_loss"]
