"""lm-eval requests/s of our `rwkv_dist` backend against lm-eval's own `hf` backend (transformers' RwkvForCausalLM on
our HF export of the same weights), on the same local tasks.

    .venv/bin/python bench/lm_eval.py [--n-layer 6 --n-embd 512] [--fewshot 5] [--batch-size 8] [--device cpu]

The model has the paper's initialization plus noise and the demo corpus's 2048-token tokenizer (built into
.cache/bench/ on first use). Tasks: the test suite's local 4-choice task (tests/lm_eval_tasks, 24 questions, few-shot
contexts) and its perplexity task (8 documents). Only the time inside the backends' request methods is counted (task
and dataset building are the same for both); fp32. The last column is the largest per-request difference of the two
backends' log-likelihoods: on whole documents it is mostly the hf backend's float32 sum of ~150 fp32 log-probs
(ours sums in float64; tests/test_lm_eval.py holds ours to 1e-4 of lm-eval's hf backend summing in float64). The
first line is a header for bench/results/lm_eval.txt: date, CPU model and its bf16/AMX flags, torch threads, load
average when it started.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# this file's folder comes first on sys.path and this file is named like the `lm_eval` package: take the folder out
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
for var, sub in (("HF_HOME", "hf"), ("TORCH_EXTENSIONS_DIR", "torch_extensions"), ("TMPDIR", "tmp")):
    os.environ.setdefault(var, str(REPO / ".cache" / sub))
    Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rwkv_dist.demo import prepare_data  # noqa: E402
from rwkv_dist.evaluation.backend import RWKVDistLM  # noqa: E402
from rwkv_dist.evaluation.harness import run_tasks, task_manager  # noqa: E402
from rwkv_dist.export import export_file  # noqa: E402
from rwkv_dist.model import RWKV, RWKVConfig  # noqa: E402

TASKS = REPO / "tests" / "lm_eval_tasks"
METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def timed(lm) -> dict:
    """Wrap the LM's request methods: {method: [requests, seconds]}."""
    spent = {m: [0, 0.0] for m in METHODS}
    for name in METHODS:
        method = getattr(lm, name)

        def run(requests, *a, _method=method, _name=name, **kw):
            start = time.perf_counter()
            out = _method(requests, *a, **kw)
            spent[_name][0] += len(requests)
            spent[_name][1] += time.perf_counter() - start
            return out

        setattr(lm, name, run)
    return spent


def scores(results: dict, task: str) -> list[float]:
    out = []
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        out += [float(r[0][0] if isinstance(r[0], (tuple, list)) else r[0]) for r in sample["resps"]]
    return out


def machine() -> str:
    """'CPU model name (N cores; avx512_bf16 yes/no, amx yes/no)' from lscpu."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    name, flags = fields.get("Model name", "unknown CPU").strip(), fields.get("Flags", "").split()
    amx = sorted(f for f in flags if f.startswith("amx"))
    return (f"{name} ({os.cpu_count()} cores; avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}, "
            f"amx {'yes (' + ', '.join(amx) + ')' if amx else 'no'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--fewshot", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(REPO)  # the local tasks' data_files are relative to the repository root

    tokenizer, _ = prepare_data(REPO / ".cache" / "bench" / "corpus")
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=tokenizer.vocab_size))
    with torch.no_grad():  # the paper init zeroes some matrices; fill them so every path does real work
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    from lm_eval.models.huggingface import HFLM

    tasks = [("rwkv_dist_mc", args.fewshot), ("rwkv_dist_ppl", None)]
    task_manager([t for t, _ in tasks], [TASKS])
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), f"{tmp}/model.pth")
        export_file(f"{tmp}/model.pth", "hf", f"{tmp}/hf", tokenizer=tokenizer)
        ours = RWKVDistLM(pretrained=f"{tmp}/model.pth", tokenizer=str(tokenizer.path), batch_size=args.batch_size,
                          device=args.device)
        hf = HFLM(pretrained=f"{tmp}/hf", device=args.device, dtype="float32", batch_size=args.batch_size,
                  max_length=4096)
        print(f"# bench/lm_eval.py, {datetime.date.today()}, {machine()}, torch threads {torch.get_num_threads()}, "
              f"load average {os.getloadavg()[0]:.1f} at start (other work shares the CPU: read the ratio)")
        print(f"RWKV L{args.n_layer} D{args.n_embd} V{tokenizer.vocab_size}, fp32 on {args.device}, batch "
              f"{args.batch_size}, torch threads {torch.get_num_threads()}")
        print(f"{'task':<16}{'requests':>9}{'rwkv_dist req/s':>17}{'hf req/s':>10}{'ratio':>8}{'max |dll|':>11}")
        for task, fewshot in tasks:
            rates, results = [], []
            for lm in (ours, hf):
                spent = timed(lm)
                results.append(run_tasks(lm, [task], include_path=[TASKS], num_fewshot=fewshot, log_samples=True,
                                         bootstrap_iters=0))
                n, seconds = map(sum, zip(*spent.values()))
                rates.append(n / seconds)
                for name in METHODS:  # unwrap for the next task
                    del lm.__dict__[name]
            diff = max(abs(a - b) for a, b in zip(scores(results[0], task), scores(results[1], task)))
            label = f"{task} {fewshot}-shot" if fewshot else task
            print(f"{label:<16}{n:>9}{rates[0]:>17.1f}{rates[1]:>10.1f}{rates[0] / rates[1]:>7.2f}x{diff:>11.2e}")


if __name__ == "__main__":
    main()
