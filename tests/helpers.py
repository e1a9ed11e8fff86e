"""Shared test fixtures that are plain functions (imported by the test modules)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_dist.model import RWKV, RWKVConfig


def random_model(seed: int = 0, n_layer: int = 3, n_embd: int = 32, vocab_size: int = 64, **kw) -> RWKV:
    """The paper's init plus noise on every weight: zero-initialized matrices would hide bugs in their paths."""
    torch.manual_seed(seed)
    model = RWKV(RWKVConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if p.dim() == 2 else 0.2
            p.add_(torch.randn_like(p) * scale)
            if "time_mix" in name:
                p.clamp_(0, 1)
    return model.eval()


def run_cli(*args) -> subprocess.CompletedProcess:
    """`rwkv-dist ARGS...` in a fresh interpreter, output captured."""
    return subprocess.run([sys.executable, "-m", "rwkv_dist.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


# ---- training runs (real DeepSpeed on gloo, in subprocesses) ----------------------------------------------------------

TRAIN_WORKER = Path(__file__).with_name("train_worker.py")


def tiny(data: str, run_dir: Path, procs: int, *overrides: str) -> list[str]:
    """A 2-layer D64 model, fp32, global batch 8 of 32 tokens: the same global batch for 1 or 2 processes."""
    from rwkv_dist.demo import DEMO_CONFIG

    return [str(DEMO_CONFIG), f"out_dir={run_dir}", f"data.sources=[{{location: {data}}}]", f"data.val={data}",
            "model.n_layer=2", "model.n_embd=64", "model.ctx_len=32", "schedule.steps=6", "schedule.micro_batch_size=4",
            "schedule.global_batch_size=8", f"schedule.grad_accum={2 // procs}", "precision=fp32",
            "optimizer.warmup_steps=2", "logging.val_batches=4", "logging.every_steps=2", "logging.val_every_steps=3",
            "checkpoint.every_steps=2", "parallel.persistence_threshold=0", "logging.peak_flops=1e12", *overrides]


def launch(args: list[str], procs: int, script: Path | None = None) -> list[str]:
    entry = [str(script)] if script else ["-m", "rwkv_dist.cli", "train"]
    if procs == 1:
        return [sys.executable, *entry, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *entry, *args]


def train(data: str, run_dir: Path, procs: int = 1, *overrides: str, script: Path | None = None,
          expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run(launch(tiny(data, run_dir, procs, *overrides), procs, script), capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == expect, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def raw_records(run_dir: Path) -> list[dict]:
    """Every per-step line of metrics.jsonl as written, also those a resume or rollback superseded."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def records(run_dir: Path) -> list[dict]:
    """The per-step records of the run's kept timeline (validation records left out)."""
    from rwkv_dist.train.observe import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir)}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from rwkv_dist.train.weights import checkpoint_weights

    return checkpoint_weights(run_dir)[0]


def assert_same_training(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                         min_close: float | None = 0.999) -> None:
    """Weights of two runs of the same training that differ only in summation order (another reduction layout or
    launcher). Adam divides by sqrt(v): where a gradient is ~0, that rounding noise can flip an update of size ~lr
    (3e-3) at a step, so such an element can end a few steps' updates apart (2 x 3e-3 seen, 1 in 131k elements);
    they are bounded by the LR budget of the tiny run (1e-2) and must be rare, while the rest agree tightly."""
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-2)
        if min_close is None:  # only the bound above (see LAUNCHER_CLOSE)
            continue
        close = torch.isclose(got[name], ref[name], rtol=1e-4, atol=1e-5)
        assert close.float().mean() > min_close, (name, close.float().mean())


def assert_trains_like(run: Path, reference: Path, clipping: bool = True) -> None:
    """A parallel layout's 6 steps against the 1-process run on the same global batches: every step's loss and
    gradient norm to 1e-5 relative, the loss falling, and the weights (assert_same_training). clipping: the reference
    clipped (grad_clip 1.0) at some step, so the clipping norm spanned every rank of the layout."""
    ref, got = losses(reference), losses(run)
    assert sorted(got) == list(range(1, 7)) and ref[6] < ref[1] - 0.5
    assert got == pytest.approx(ref, rel=1e-5, abs=0)
    norms = [r["grad_norm"] for r in records(reference)]
    if clipping:
        assert max(norms) > 1.0
    assert [r["grad_norm"] for r in records(run)] == pytest.approx(norms, rel=1e-5)
    assert_same_training(weights(run), weights(reference))


def assert_redone_steps_are_bitwise(run: Path) -> None:
    """A run killed and resumed: every step computed again has bitwise the loss and gradient norm of its first
    computation (weights, optimizer state and data position were all restored), and all 6 steps were done."""
    first: dict[int, tuple] = {}
    again = 0
    for r in raw_records(run):
        seen = (r["loss"], r["grad_norm"])
        if r["step"] in first:
            assert seen == first[r["step"]], (r["step"], seen, first[r["step"]])
            again += 1
        first[r["step"]] = seen
    assert again >= 1 and sorted(first) == list(range(1, 7))


def kill_all_at_step(proc: subprocess.Popen, run_dir: Path, step: int) -> int:
    """SIGKILL a launcher and every process below it (torchrun starts its workers in sessions of their own: no clean
    exit anywhere) once `step` is logged; returns the step the run had reached."""
    import time

    import psutil

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= step:
            break
        time.sleep(0.02)
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in family:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)
    proc.wait()
    return max(losses(run_dir))


# Losses of the same training under another launcher (Ray Train, the deepspeed launcher) vs torchrun. Those launchers
# agree with each other bitwise and torchrun runs agree with each other bitwise, but across the two DeepSpeed's CPU
# all-reduce differs in rounding (seen: 2.6e-5 relative at step 6 of the tiny run, after a 1-ulp start), which a few
# Adam steps amplify: under Ray up to 6% of a zero-initialized matrix's (tiny) elements ended beyond 1e-5 of
# torchrun's. Across launchers weights are therefore held to the LR-budget bound of assert_same_training only.
LAUNCHER_REL = 1e-4
LAUNCHER_CLOSE = None


def assert_train_refuses(data: str, out: Path, overrides: list[str], message: str, env: dict | None = None) -> None:
    """`rwkv-dist train` on the tiny run with `overrides` exits 2 with exactly one error line containing `message`,
    and writes nothing to `out`."""
    done = subprocess.run([sys.executable, "-m", "rwkv_dist.cli", "train", *tiny(data, out, 1, *overrides)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [x for x in done.stderr.splitlines() if "error:" in x]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]
    assert not out.exists()
