"""Pipeline parallelism with ZeRO-3 inside every stage, on real DeepSpeed and gloo process groups: every layout trains
exactly what one process trains, shards each stage's state over its replicas, resumes bitwise after SIGKILL (also
under Ray with a worker killed), exports, and refuses bad layouts in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_dist.model.state_dict import load_rwkv

from helpers import (LAUNCHER_CLOSE, LAUNCHER_REL, TRAIN_WORKER, assert_same_training, assert_trains_like, assert_train_refuses,
                     kill_all_at_step, launch, losses, raw_records, records, run_cli, weights)

# a 4-block model (so 4 stages fit), 8 sequences per step as 4 micro-batches of 2 per data-parallel rank and step
BASE = ["model.n_layer=4", "schedule.micro_batch_size=2"]


def pipe(stages: int, procs: int, *extra: str) -> list[str]:
    return [*BASE, "parallel.strategy=pipeline", f"parallel.pipeline_stages={stages}",
            f"schedule.grad_accum={4 * stages // procs}", *extra]


def run(data: str, out: Path, procs: int, *overrides: str, script: Path | None = None, expect: int = 0):
    from helpers import tiny

    args = tiny(data, out, procs, *overrides)
    done = subprocess.run(launch(args, procs, script), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == expect, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.fixture(scope="session")
def pipeline_runs(data, tmp_path_factory) -> dict[str, Path]:
    """The same 6-step fp32 training: 1 process, P=2 x DP=1 (1F1B, with the collective record), P=2 x DP=2 (torchrun
    x 4, the CLI), P=4 x DP=1 (GPipe); and bf16 on 1 process and on P=2."""
    root = tmp_path_factory.mktemp("pipeline")
    out = {name: root / name for name in ("one", "p2", "p2d2", "p4", "one-bf16", "p2-bf16")}
    run(data, out["one"], 1, *BASE, "schedule.grad_accum=4", script=TRAIN_WORKER)
    run(data, out["p2"], 2, *pipe(2, 2), script=TRAIN_WORKER)
    run(data, out["p2d2"], 4, *pipe(2, 4))
    run(data, out["p4"], 4, *pipe(4, 4, "parallel.pipeline_schedule=gpipe"))
    run(data, out["one-bf16"], 1, *BASE, "schedule.grad_accum=4", "precision=bf16")
    run(data, out["p2-bf16"], 2, *pipe(2, 2, "precision=bf16"))
    return out


@pytest.mark.parametrize("layout", ["p2", "p2d2", "p4"])
def test_every_pipeline_layout_trains_exactly_what_one_process_trains(pipeline_runs, layout):
    assert_trains_like(pipeline_runs[layout], pipeline_runs["one"])  # with clipping: its norm spans all stages


def test_bf16_pipeline_follows_the_bf16_single_process_run(pipeline_runs):
    ref, got = losses(pipeline_runs["one-bf16"]), losses(pipeline_runs["p2-bf16"])
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-5)
    fp32 = losses(pipeline_runs["one"])
    assert got == pytest.approx(fp32, abs=0.05)  # and bf16 stays near fp32 (fp32 WKV, fp32 masters)


def test_each_stage_is_sharded_over_its_replicas_only(pipeline_runs):
    one = json.loads((pipeline_runs["one"] / "ranks" / "rank_00000.json").read_text())["model_state_bytes"]
    held = [json.loads(p.read_text()) for p in sorted((pipeline_runs["p2d2"] / "ranks").glob("rank_*.json"))]
    assert [h["stage"] for h in held] == [0, 0, 1, 1]
    assert max(h["model_state_bytes"] for h in held) <= 0.27 * one, ([h["model_state_bytes"] for h in held], one)
    stage0, stage1 = held[0]["param_elements_total"], held[2]["param_elements_total"]
    from rwkv_dist.model import RWKVConfig

    assert stage0 + stage1 == RWKVConfig(n_layer=4, n_embd=64, vocab_size=2048).num_params()


def test_pipeline_checkpoints_hold_every_stage_and_export_the_whole_model(pipeline_runs, tmp_path):
    folder = sorted((pipeline_runs["p2d2"] / "checkpoints").glob("step_*"))[-1]
    names = {p.name for p in folder.glob("*.pt")}
    assert {f"zero_pp_rank_{d}_mp_rank_{s:02d}_optim_states.pt" for d in (0, 1) for s in (0, 1)} <= names
    state = [json.loads((folder / "trainer" / f"rank_{r:05d}.json").read_text()) for r in range(4)]
    assert [len(s["data"]) for s in state] == [2, 2, 0, 0]  # the first stage keeps the data position
    saved = torch.load(pipeline_runs["one"] / "engine_logits.pt", weights_only=True)
    done = run_cli("export", pipeline_runs["p2d2"], "--format", "blinkdl", "--out", tmp_path / "model.pth")
    assert done.returncode == 0, done.stderr
    model = load_rwkv(torch.load(tmp_path / "model.pth", weights_only=True), "export")
    with torch.no_grad():
        torch.testing.assert_close(model(saved["tokens"]), saved["logits"], rtol=0, atol=1e-5)
    # and the pipeline's own forward (last stage) gives the one-process model's logits
    p2 = torch.load(pipeline_runs["p2"] / "engine_logits.pt", weights_only=True)
    torch.testing.assert_close(p2["logits"], saved["logits"], rtol=0, atol=1e-5)


def test_pipeline_point_to_point_stays_on_the_run_device(pipeline_runs):
    for path in sorted((pipeline_runs["p2"] / "collectives").glob("rank_*.json")):
        seen = json.loads(path.read_text())
        ops = {c["op"] for c in seen["calls"]}
        assert {"isend", "recv"} <= ops, ops
        for call in seen["calls"]:
            assert call["file"] in ("train/distributed.py", "parallel/pipeline.py"), call
            assert all(d == seen["device"] for d in call["devices"]), call


def test_metrics_come_from_the_stage_that_holds_the_loss(pipeline_runs):
    out = pipeline_runs["p2d2"]
    assert {r["step"] for r in records(out)} == set(range(1, 7))
    assert all(0 < r["mfu"] < 1 for r in records(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["val loss"] < 8


def test_guards_and_activation_checkpointing_work_across_stages(pipeline_runs, data, tmp_path):
    """A NaN loss on the last stage makes every stage skip the update (the global norm is non-finite everywhere); a
    streak rolls every stage back to the last checkpoint; recomputed activations, and parameters and optimizer state
    offloaded to the CPU, give the same numbers."""
    out = tmp_path / "guarded"
    done = run(data, out, 2, *pipe(2, 2, "parallel.activation_checkpointing=true", "schedule.steps=8",
                                   "faults.nan_loss_at_steps=[3,5,6]", "guard.max_bad_steps=2",
                                   "parallel.offload_optimizer=true", "parallel.offload_params=true"))
    recs = raw_records(out)
    assert [r["step"] for r in recs if not r["applied"]] == [3, 5, 6]
    assert "rolling back to step_00000004" in done.stdout
    assert [r["step"] for r in records(out)] == list(range(1, 9)) and records(out)[-1]["rollbacks"] == 1
    ref = losses(pipeline_runs["p2"])
    assert [losses(out)[s] for s in (1, 2)] == [ref[1], ref[2]]  # before the first fault: bitwise
    assert all(torch.isfinite(t).all() for t in weights(out).values())


def test_generate_and_eval_read_a_pipeline_checkpoint(pipeline_runs, data):
    done = run_cli("generate", pipeline_runs["p2d2"], "--prompt", "def ", "--max-tokens", "8", "--seed", "1")
    assert done.returncode == 0 and done.stdout.startswith("def "), done.stderr[-2000:]
    ref = run_cli("generate", pipeline_runs["one"], "--prompt", "def ", "--max-tokens", "8", "--seed", "1")
    assert done.stdout == ref.stdout  # the same trained model
    done = run_cli("eval", pipeline_runs["p2d2"], "--data", data, "--batch-size", "4", "--max-batches", "2")
    assert done.returncode == 0 and "val loss" in done.stdout, done.stderr[-2000:]


def test_sigkill_of_a_pipeline_then_resume_auto_is_bitwise(pipeline_runs, data, tmp_path):
    from helpers import tiny

    out = tmp_path / "killed"
    proc = subprocess.Popen(launch(tiny(data, out, 2, *pipe(2, 2)), 2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    killed_at = kill_all_at_step(proc, out, 3)
    assert 3 <= killed_at < 6, killed_at
    run(data, out, 2, *pipe(2, 2), "checkpoint.resume=auto")
    assert len(raw_records(out)) > 6  # some steps were computed twice
    assert losses(out) == losses(pipeline_runs["p2"])
    w_a, w_b = weights(pipeline_runs["p2"]), weights(out)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_a_pipeline_on_four_ray_workers_survives_a_killed_worker(pipeline_runs, data, tmp_path):
    from helpers import tiny
    from test_launch import RAY_ENV, kill_rank_when

    out = tmp_path / "ray"
    # gathered once per step (the other gather setting) and still the training of the per-micro-batch torchrun run
    layout = pipe(2, 4, "parallel.pipeline_gather=step")
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_dist.cli", "launch", *tiny(data, out, 4, *layout),
                             "--workers", "4", "--max-failures", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **RAY_ENV})
    killed_at = kill_rank_when(out, rank=3, step=3, proc=proc)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert killed_at < 6 and len(raw_records(out)) > 6
    assert losses(out) == pytest.approx(losses(pipeline_runs["p2d2"]), rel=LAUNCHER_REL)
    assert_same_training(weights(out), weights(pipeline_runs["p2d2"]), LAUNCHER_CLOSE)


LAYOUT_ERRORS = [
    (pipe(2, 2), {"WORLD_SIZE": "3"}, "parallel.pipeline_stages (2) does not divide the world size (3)"),
    (pipe(8, 8), {}, "parallel.pipeline_stages (8) exceeds model.n_layer (4)"),
    (pipe(2, 2, "parallel.stage_layers=[1,2]"), {}, "parallel.stage_layers [1, 2] sums to 3, model.n_layer is 4"),
    (pipe(2, 2, "parallel.stage_layers=[4,0]"), {}, "every stage needs at least one block"),
    (pipe(2, 2, "parallel.stage_layers=[4]"), {}, "parallel.stage_layers has 1 entries for 2 pipeline stages"),
    (pipe(4, 4, "schedule.grad_accum=2", "schedule.micro_batch_size=4"), {},
     "schedule.grad_accum (2) is below parallel.pipeline_stages (4)"),
    (["parallel.pipeline_stages=2"], {}, "parallel.pipeline_stages / stage_layers need strategy pipeline"),
]


@pytest.mark.parametrize("overrides, env, message", LAYOUT_ERRORS)
def test_bad_pipeline_layouts_are_one_line_errors_before_any_work(data, tmp_path, overrides, env, message):
    assert_train_refuses(data, tmp_path / "never", overrides, message, env)


def test_balanced_split_counts_the_embedding_and_head():
    from rwkv_dist.model import RWKVConfig
    from rwkv_dist.parallel.pipeline import balanced_stage_layers, schedule

    big_vocab = RWKVConfig(n_layer=8, n_embd=64, vocab_size=4096)  # emb and head ~ 5 blocks each
    assert balanced_stage_layers(big_vocab, 2) == [4, 4]
    assert balanced_stage_layers(big_vocab, 3) == [1, 6, 1]
    assert balanced_stage_layers(RWKVConfig(n_layer=8, n_embd=256, vocab_size=16), 4) == [2, 2, 2, 2]
    # 1F1B: warm-up forwards, then one forward one backward, then the remaining backwards, in micro-batch order
    assert schedule("1f1b", 0, 2, 4) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2), ("B", 3)]
    assert schedule("1f1b", 1, 2, 4) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2), ("F", 3), ("B", 3)]
    assert schedule("gpipe", 0, 2, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
