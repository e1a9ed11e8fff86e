"""`rwkv-dist launch`: the trainer on Ray Train workers (a local Ray instance, gloo), recovery from a killed worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import (LAUNCHER_CLOSE, LAUNCHER_REL, assert_same_training, losses, raw_records, run_cli, tiny,
                     weights)

RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_DEDUP_LOGS": "0"}


def ray_launch(data: str, run_dir: Path, *flags: str, overrides: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rwkv_dist.cli", "launch", *tiny(data, run_dir, 2, *overrides),
                             "--workers", "2", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **RAY_ENV})


def kill_rank_when(run_dir: Path, rank: int, step: int, proc: subprocess.Popen) -> int:
    """SIGKILL training rank `rank` once step `step` is logged; returns the step it had reached."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= step:
            pid = json.loads((run_dir / "workers" / f"rank_{rank:05d}.json").read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
            return max(losses(run_dir))
        time.sleep(0.01)
    raise AssertionError(f"step {step} never came: {proc.poll()}")


@pytest.fixture(scope="module")
def ray_run(data, tmp_path_factory) -> tuple[Path, str, str]:
    run = tmp_path_factory.mktemp("ray") / "run"
    proc = ray_launch(data, run)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return run, out, err


def test_launch_on_two_ray_workers_follows_the_torchrun_curve(ray_run, runs):
    run, out, err = ray_run
    assert "run demo finished" in out
    # rank 0's progress reaches the driver's output (its stdout is no terminal): a line per logging.every_steps (2),
    # once (Ray Train's print patch would also log each print to stderr), and no traceback from Ray's machinery
    progress = [line for line in (out + err).splitlines() if "step " in line and "tok/s" in line and "ETA" in line]
    assert [p.split("step ")[1].split()[0] for p in progress] == ["2/6", "4/6", "6/6"], out[-3000:] + err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    # same ranks and data; the launchers' process groups need not sum in the same order (seen: 5e-6 at one step)
    assert losses(run) == pytest.approx(losses(runs["zero3"]), rel=LAUNCHER_REL)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]
    held = [json.loads(p.read_text()) for p in sorted((run / "ranks").glob("rank_*.json"))]
    assert [h["world_size"] for h in held] == [2, 2]
    assert_same_training(weights(run), weights(runs["zero3"]), LAUNCHER_CLOSE)


def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(ray_run, data, tmp_path):
    reference, _, _ = ray_run
    run = tmp_path / "fault"
    started = time.time()
    proc = ray_launch(data, run, "--max-failures", "2")
    killed_at = kill_rank_when(run, rank=1, step=3, proc=proc)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    steps = [r["step"] for r in raw_records(run)]
    redone = len(steps) - len(set(steps))
    assert 0 < redone <= 2, steps  # at most one checkpoint interval (2 steps) of work is done again
    assert steps[-1] == 6 and killed_at < 6
    # every replayed step reproduced the loss of its first run: it started from the exact committed state
    first: dict[int, float] = {}
    for r in raw_records(run):
        assert first.setdefault(r["step"], r["loss"]) == r["loss"], r
    assert losses(run) == losses(reference)
    w_a, w_b = weights(reference), weights(run)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    print(f"fault run: killed rank 1 at step {killed_at}, finished in {time.time() - started:.0f} s, {redone} steps redone")


def test_with_no_restarts_left_the_error_names_the_dead_worker(data, tmp_path):
    run = tmp_path / "fatal"
    proc = ray_launch(data, run, "--max-failures", "0", overrides=("schedule.steps=40",))
    kill_rank_when(run, rank=1, step=2, proc=proc)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, out[-2000:] + err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("rwkv-dist launch: error:")]
    assert len(line) == 1, err[-3000:]
    assert "failed after 0 restart(s) allowed by --max-failures: worker rank 1 (pid " in line[0], line[0]


LAUNCH_ERRORS = [
    (["--workers", "3"], "x world size = 4 x 1 x 3 = 12, but global_batch_size is 8"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--workers", "2", "--address", "cluster"], "--address must be local, auto or ray://HOST:PORT, got 'cluster'"),
    (["--workers", "2", "--max-failures", "-1"], "--max-failures must be >= 0, got -1"),
    (["--workers", "2", "--cpus-per-worker", "0"], "--cpus-per-worker must be > 0"),
    (["--workers", "2", "data.val=/nonexistent"], "data.val: "),
]


@pytest.mark.parametrize("args, message", LAUNCH_ERRORS)
def test_bad_launch_arguments_are_one_clear_error(data, tmp_path, args, message):
    extra = [a for a in args if "=" in a]
    flags = [a for a in args if "=" not in a]
    done = run_cli("launch", *tiny(data, tmp_path / "never", 2, *extra), *flags)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [x for x in done.stderr.splitlines() if "error:" in x]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]
    assert not (tmp_path / "never").exists()


def test_dry_run_prints_the_plan_and_starts_nothing(data, tmp_path):
    done = run_cli("launch", *tiny(data, tmp_path / "dry", 2), "--workers", "2", "--max-failures", "5", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "workers        2 x (CPU 1, GPU 0); backend gloo; micro 4 x accum 1 x 2 ranks = 8" in done.stdout
    assert "up to 5 restart(s)" in done.stdout and "rwkv-dist train" in done.stdout
    assert not (tmp_path / "dry").exists()
