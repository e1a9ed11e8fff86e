"""The trainer with real DeepSpeed on gloo: sharding, strategy equivalence, exact resume after SIGKILL, interrupted
saves, guards, TensorBoard, export/generate/eval from training checkpoints."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_dist.model import RWKVConfig
from rwkv_dist.model.state_dict import load_rwkv
from rwkv_dist.train.checkpoint import CheckpointStore

from helpers import (LAUNCHER_CLOSE, LAUNCHER_REL, assert_same_training, kill_all_at_step, launch, losses,
                     raw_records, records, run_cli, tiny, train, weights)

def test_zero3_shards_parameters_over_two_ranks(runs):
    for name, share in (("zero3", 0.5), ("ddp", 1.0), ("one", 1.0)):
        held = [json.loads(p.read_text()) for p in sorted((runs[name] / "ranks").glob("rank_*.json"))]
        assert len(held) == (1 if name == "one" else 2)
        for h in held:
            assert h["param_elements_total"] == RWKVConfig(n_layer=2, n_embd=64, vocab_size=2048).num_params()
            assert abs(h["param_elements_held"] / h["param_elements_total"] - share) < 0.02, (name, h)
    one = json.loads((runs["one"] / "ranks" / "rank_00000.json").read_text())["model_state_bytes"]
    two = [json.loads(p.read_text())["model_state_bytes"] for p in (runs["zero3"] / "ranks").glob("rank_*.json")]
    assert max(two) <= 0.55 * one, (two, one)


@pytest.mark.parametrize("strategy", ["zero3", "ddp"])
def test_two_ranks_follow_the_one_process_loss_curve(runs, strategy):
    ref, got = losses(runs["one"]), losses(runs[strategy])
    assert sorted(ref) == sorted(got) == list(range(1, 7))
    assert ref[6] < ref[1] - 0.5  # it trains
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), (step, got[step], ref[step])
    assert_same_training(weights(runs[strategy]), weights(runs["one"]))


def test_every_strategy_logs_the_same_gradient_norm(runs):
    ref = {r["step"]: r["grad_norm"] for r in records(runs["one"])}
    assert all(v is not None and v > 0 for v in ref.values())
    assert any(v > 1.0 for v in ref.values())  # clipping (grad_clip 1.0) was active at some step
    for name in ("zero3", "ddp"):
        got = {r["step"]: r["grad_norm"] for r in records(runs[name])}
        assert got == pytest.approx(ref, rel=1e-4), name


def test_trainer_collectives_go_through_the_world_on_its_device(runs):
    for path in sorted((runs["zero3"] / "collectives").glob("rank_*.json")):
        seen = json.loads(path.read_text())
        calls = seen["calls"]
        ops = {c["op"] for c in calls}
        assert {"all_reduce", "broadcast_object_list", "barrier"} <= ops, ops  # loss mean, resume decision, saves
        for call in calls:
            assert call["file"] == "train/distributed.py", call  # nothing else calls torch.distributed directly
            assert all(d == seen["device"] for d in call["devices"]), call


def test_world_sum_moves_tensors_to_the_communication_device():
    from rwkv_dist.train.distributed import World

    world = World(rank=0, size=1, local_rank=0, device=torch.device("meta"))
    assert world.on_device(torch.ones(2)).device.type == "meta"  # what a CUDA world does with a CPU tensor


def test_setup_does_not_build_deepspeeds_inference_shm_op(tmp_path):
    """distributed.setup() joins DeepSpeed's comm layer without JIT-building its shared-memory all-reduce op (~30 s of
    a first run, used only by DeepSpeed inference): nothing lands in a fresh TORCH_EXTENSIONS_DIR, and collectives
    still work. On CPU it also keeps freed memory (test_hardware): a freed 64 MiB tensor comes back without faults."""
    code = """
import resource, torch, deepspeed.comm.comm as c, torch.distributed as d
from rwkv_dist.train.distributed import setup
w = setup(); t = torch.ones(1); d.all_reduce(t)
faults = []
for _ in range(16):  # the fewest of 16 rounds, as in test_hardware
    f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; x = torch.ones(16 << 20); del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
print("faults", min(faults), c.cdb.shm_comm_op, w.size, t.item())
"""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "DS_ACCELERATOR": "cpu"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["None", "1", "1.0"], done.stdout
    if sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION"):
        assert int(done.stdout.split()[-4]) < 1000, done.stdout
    assert "built successfully" not in done.stdout + done.stderr
    assert not any((tmp_path / "ext").glob("*shm*"))


def test_each_rank_checks_only_the_checkpoint_files_it_loads(runs):
    from rwkv_dist.train.checkpoint import pickle_files, rank_files

    folder = CheckpointStore(runs["zero3"] / "checkpoints").committed()[-1]
    mine = [set(p.name for p in rank_files(folder, r)) for r in (0, 1)]
    assert {n for n in mine[0] if "zero_pp_rank_1_" in n} == set() and any("zero_pp_rank_0_" in n for n in mine[0])
    assert {n for n in mine[1] if "zero_pp_rank_0_" in n} == set() and any("zero_pp_rank_1_" in n for n in mine[1])
    assert mine[0] | mine[1] == {p.name for p in pickle_files(folder)}


def _resumed_copy(run: Path, tmp_path: Path, name: str) -> Path:
    """A copy of a finished 6-step run without its last checkpoint: resuming it recomputes steps 5 and 6."""
    import shutil

    copy = tmp_path / name
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000006")
    return copy


@pytest.mark.parametrize("saved, procs, strategy", [("zero3", 1, "zero3"), ("one", 2, "zero3"), ("ddp", 1, "ddp")])
def test_resume_on_another_world_size_continues_the_same_training(runs, data, tmp_path, saved, procs, strategy):
    run = _resumed_copy(runs[saved], tmp_path, "resumed")
    done = train(data, run, procs, f"parallel.strategy={strategy}")
    assert "resumed from" in done.stdout and "step_00000004" in done.stdout
    ref = losses(runs[saved])
    assert losses(run) == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert_same_training(weights(run), weights(runs[saved]))
    held = [json.loads(p.read_text()) for p in sorted((run / "ranks").glob("rank_*.json"))]
    assert [h["world_size"] for h in held] == [procs] * procs


def test_a_run_continues_exactly_after_its_shards_moved(runs, data, tmp_path):
    import shutil

    moved = tmp_path / "moved-data"
    shutil.copytree(data, moved)
    run = _resumed_copy(runs["one"], tmp_path, "moved")
    train(data, run, 1, f"data.sources=[{{location: {moved}}}]", f"data.val={moved}")
    assert losses(run) == losses(runs["one"])  # bitwise: the same shuffle order from the new location
    w_a, w_b = weights(runs["one"]), weights(run)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_checkpoints_commit_keep_last_and_point_latest(runs):
    store = CheckpointStore(runs["zero3"] / "checkpoints")
    names = [p.name for p in store.committed()]
    assert names == ["step_00000004", "step_00000006"]  # keep_last 2 of the demo config
    assert (store.root / "latest").read_text().strip() == "step_00000006"
    assert not list(store.root.glob("*.partial"))
    folder = store.committed()[-1]
    assert {p.name for p in (folder / "trainer").iterdir()} == {
        "rank_00000.json", "rank_00001.json", "rank_00000.rng.safetensors", "rank_00001.rng.safetensors"}
    state = json.loads((folder / "trainer" / "rank_00001.json").read_text())
    assert state["step"] == 6 and state["tokens"] == 6 * 8 * 32 and len(state["data"]) == 1


def test_tensorboard_scalars_read_back(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["one"] / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/mfu", "perf/memory_gb",
            "guard/skipped_steps", "val/loss"} <= tags
    by_step = losses(runs["one"])
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(logged) == [2, 4, 6]
    for step, value in logged.items():
        assert value == pytest.approx(by_step[step], rel=1e-6)
    assert [e.step for e in acc.Scalars("val/loss")] == [3, 6]
    assert all(0 < e.value < 1 for e in acc.Scalars("perf/mfu"))


def test_export_of_a_zero3_checkpoint_gives_the_training_models_logits(runs, tmp_path):
    saved = torch.load(runs["zero3"] / "engine_logits.pt", weights_only=True)
    done = run_cli("export", runs["zero3"], "--format", "blinkdl", "--out", tmp_path / "model.pth")
    assert done.returncode == 0, done.stderr
    model = load_rwkv(torch.load(tmp_path / "model.pth", weights_only=True), "export")
    with torch.no_grad():
        logits = model(saved["tokens"])
    torch.testing.assert_close(logits, saved["logits"], rtol=0, atol=1e-5)


def test_generate_and_eval_a_trained_checkpoint(runs, data):
    done = run_cli("generate", runs["zero3"], "--prompt", "def ", "--max-tokens", "12", "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("def ") and len(done.stdout.strip()) > len("def ")
    again = run_cli("generate", runs["zero3"], "--prompt", "def ", "--max-tokens", "12", "--seed", "3")
    assert again.stdout == done.stdout  # seeded
    done = run_cli("eval", runs["zero3"], "--data", data, "--batch-size", "4", "--max-batches", "4")
    assert done.returncode == 0, done.stderr
    loss = float(done.stdout.split("val loss ")[1].split()[0])
    trained = [r for r in records(runs["zero3"])]
    assert loss < math.log(2048)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["zero3"] / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    final_val = acc.Scalars("val/loss")[-1].value  # the trainer's val pass: same batches, same ctx_len
    assert loss == pytest.approx(final_val, abs=2e-4), (loss, final_val, trained[-1])


def test_offload_variant_trains(data, tmp_path):
    run = tmp_path / "offload"
    train(data, run, 2, "precision=bf16", "parallel.offload_optimizer=true", "parallel.offload_params=true",
          "schedule.steps=4", "optimizer.warmup_steps=0")
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4] and all(math.isfinite(v) for v in got.values())
    assert got[4] < got[1]
    assert CheckpointStore(run / "checkpoints").committed()[-1].name == "step_00000004"


def test_sigkill_then_resume_auto_is_bitwise_identical(data, tmp_path):
    steps = ["schedule.steps=12"]
    straight = tmp_path / "straight"
    train(data, straight, 2, *steps)
    broken = tmp_path / "broken"
    proc = subprocess.Popen(launch(tiny(data, broken, 2, *steps), 2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    killed_at = kill_all_at_step(proc, broken, 5)
    assert 5 <= killed_at < 12, killed_at
    resumed_from = CheckpointStore(broken / "checkpoints").committed()[-1].name
    train(data, broken, 2, *steps, "checkpoint.resume=auto")
    steps_logged = [r["step"] for r in raw_records(broken)]
    assert steps_logged.count(int(resumed_from[-8:]) + 1) == 2, (str(steps_logged), resumed_from, killed_at)  # replayed
    assert losses(broken) == losses(straight)  # bitwise: same floats
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(broken / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()  # the steps written before the kill and redone after it appear once, with the kept values
    assert {e.step: e.value for e in acc.Scalars("train/loss")} == pytest.approx(
        {s: v for s, v in losses(straight).items() if s % 2 == 0}, rel=1e-6)
    assert len(acc.Scalars("train/loss")) == 6
    w_a, w_b = weights(straight), weights(broken)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_a_save_killed_before_commit_leaves_the_previous_checkpoint(runs, data, tmp_path):
    run = tmp_path / "crash"
    train(data, run, 1, "faults.crash_in_save_at_step=4", expect=-signal.SIGKILL)
    store = CheckpointStore(run / "checkpoints")
    assert [p.name for p in store.committed()] == ["step_00000002"]
    partial = run / "checkpoints" / "step_00000004.partial"
    assert partial.is_dir() and any(partial.rglob("*.pt"))  # written, never committed
    assert (store.root / "latest").read_text().strip() == "step_00000002"
    train(data, run, 1)  # checkpoint.resume defaults to auto
    assert not partial.exists()
    assert losses(run) == losses(runs["one"])
    w_a, w_b = weights(runs["one"]), weights(run)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_nan_steps_are_skipped_and_a_streak_rolls_back(data, tmp_path):
    run = tmp_path / "nan"
    done = train(data, run, 2, "schedule.steps=8", "faults.nan_loss_at_steps=[3,5,6]", "guard.max_bad_steps=2")
    recs = raw_records(run)
    skipped = [r["step"] for r in recs if not r["applied"]]
    assert skipped == [3, 5, 6]
    kept = records(run)  # the timeline the run kept: each step once, 5 and 6 as redone after the rollback
    assert [r["step"] for r in kept] == list(range(1, 9)) and [r["applied"] for r in kept].count(False) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["steps computed"] == 10  # tokens/s counts the 2 discarded steps too
    assert "rolling back to step_00000004" in done.stdout
    last = recs[-1]
    assert last["step"] == 8 and last["skipped_steps"] == 3 and last["rollbacks"] == 1
    assert [r["step"] for r in recs].count(5) == 2  # steps 5 and 6 ran again after the rollback, on new data
    w = weights(run)
    assert all(torch.isfinite(t).all() for t in w.values())


def test_ddp_fp32_refuses_non_finite_gradients(data, tmp_path):
    run = tmp_path / "ddp-nan"
    # a peak of 1 kFLOP/s makes the measured MFU exceed 1: it must be reported as unknown, never as 100%+
    done = train(data, run, 1, "parallel.strategy=ddp", "schedule.steps=3", "faults.nan_loss_at_steps=[2]",
                 "logging.peak_flops=1000")
    assert [r["applied"] for r in records(run)] == [True, False, True]
    assert [r["mfu"] for r in records(run)] == [None] * 3
    assert done.stdout.count("MFU would exceed 100%") == 1
    assert json.loads((run / "summary.json").read_text())["MFU"].startswith("unknown")
    assert all(torch.isfinite(t).all() for t in weights(run).values())


def test_non_finite_streak_without_a_checkpoint_stops_with_a_clear_error(data, tmp_path):
    run = tmp_path / "nan-early"
    done = train(data, run, 1, "faults.nan_loss_at_steps=[1,2]", "guard.max_bad_steps=2", "checkpoint.every_steps=100",
                 expect=2)
    assert "error: 2 non-finite steps, 2 in a row at step 2, and no checkpoint to roll back to" in done.stderr


def _one_line_error(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    lines = [x for x in done.stderr.splitlines() if "error:" in x]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


TRAIN_ERRORS = [
    ([], {"WORLD_SIZE": "3"}, "x world size = 4 x 2 x 3 = 24, but global_batch_size is 8"),
    (["schedule.steps=abc"], {}, "schedule.steps: Input should be a valid integer"),
    (["data.sources=[{location: /nonexistent/data}]"], {}, "data.sources.0.location: "),
    (["data.val=/nonexistent/val"], {}, "data.val: "),
    (["model.vocab_size=100"], {}, "model.vocab_size (100) is smaller than the data's tokenizer (2048 tokens"),
    (["checkpoint.resume=/nonexistent/step_00000002"], {}, "no such checkpoint folder"),
    (["parallel.strategy=ddp", "parallel.offload_optimizer=true"], {}, "parallel.offload_optimizer needs strategy zero3"),
]


@pytest.mark.parametrize("overrides, env, message", TRAIN_ERRORS)
def test_bad_train_input_is_one_clear_error_before_any_work(data, tmp_path, overrides, env, message):
    run = tmp_path / "never"
    done = subprocess.run([sys.executable, "-m", "rwkv_dist.cli", "train", *tiny(data, run, 1, *overrides)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    _one_line_error(done, message)
    assert not run.exists()  # nothing written


def test_train_errors_on_existing_runs_damage_nothing(runs, data, tmp_path):
    before = _snapshot(runs["one"])
    # resuming into another model shape
    done = run_cli("train", *tiny(data, runs["one"], 1, "model.n_embd=32"))
    _one_line_error(done, "saved with model = ")
    # resuming from an uncommitted folder
    partial = tmp_path / "step_00000002.partial"
    partial.mkdir()
    done = run_cli("train", *tiny(data, tmp_path / "x", 1), "--resume", partial)
    _one_line_error(done, "not a committed checkpoint (no COMPLETE.json; an interrupted save?)")
    # out_dir that is a file
    (tmp_path / "file").write_text("x")
    done = run_cli("train", *tiny(data, tmp_path / "file", 1))
    _one_line_error(done, "out_dir: ")
    assert _snapshot(runs["one"]) == before


def test_a_checkpoint_with_a_code_carrying_pickle_is_refused(runs, tmp_path):
    import shutil

    run = tmp_path / "evil"
    shutil.copytree(runs["one"], run)
    folder = CheckpointStore(run / "checkpoints").committed()[-1]
    target = next(folder.glob("*model_states.pt"))
    flag = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    torch.save({"module": Evil()}, target)
    for cmd in (["export", run, "--format", "blinkdl", "--out", tmp_path / "m.pth"], ["generate", run, "--prompt", "a"]):
        done = run_cli(*cmd)
        _one_line_error(done, f"{target}: refused to load, not weights-only (")
        assert "posix.system" in done.stderr
    assert not flag.exists() and not (tmp_path / "m.pth").exists()


CLI_ERRORS = [
    (["generate", "/nonexistent/run", "--prompt", "a"], "/nonexistent/run: no such checkpoint or run folder"),
    (["generate", "RUN", "--prompt", "a", "--temperature", "0"], "--temperature must be positive, got 0"),
    (["generate", "RUN", "--prompt", "a", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["generate", "RUN", "--prompt", "a", "--max-tokens", "-3"], "--max-tokens must be positive, got -3"),
    (["generate", "PTH", "--prompt", "a"], "a weights file carries no tokenizer; pass --tokenizer"),
    (["eval", "RUN", "--data", "/nonexistent/data"], "/nonexistent/data"),
    (["eval", "RUN", "--data", "DATA", "--batch-size", "x"], "--batch-size must be a positive int, got 'x'"),
    (["export", "EMPTY", "--format", "hf", "--out", "OUT"], "no committed checkpoint in it"),
]


@pytest.mark.parametrize("args, message", CLI_ERRORS)
def test_bad_generate_eval_export_arguments(runs, data, tmp_path, args, message):
    pth = tmp_path / "w.pth"
    if "PTH" in args:
        torch.save(weights(runs["one"]), pth)
    (tmp_path / "empty").mkdir()
    subst = {"RUN": runs["one"], "PTH": pth, "DATA": data, "EMPTY": tmp_path / "empty", "OUT": tmp_path / "out"}
    done = run_cli(*[subst.get(a, a) for a in args])
    _one_line_error(done, message)
    assert not (tmp_path / "out").exists()


def test_activation_checkpointing_recomputes_the_same_numbers(runs, data, tmp_path):
    run = tmp_path / "ckpt"
    train(data, run, 1, "parallel.activation_checkpointing=true", "schedule.steps=3")
    ref = losses(runs["one"])
    assert losses(run) == {s: ref[s] for s in (1, 2, 3)}


def test_the_deepspeed_launcher_runs_the_same_training(runs, data, tmp_path):
    run = tmp_path / "ds"
    deepspeed = Path(sys.executable).with_name("deepspeed")
    done = subprocess.run([str(deepspeed), "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
                           "rwkv_dist.cli", "train", *tiny(data, run, 2)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # one BLAS thread, as the torchrun runs
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ref = losses(runs["zero3"])  # same ranks and data; the launchers' all-reduce rounds differently
    assert losses(run) == pytest.approx(ref, rel=LAUNCHER_REL)
    assert_same_training(weights(run), weights(runs["zero3"]), LAUNCHER_CLOSE)


def _free_port() -> int:
    """A port that binds now, below Linux's ephemeral range (32768+): the ranks bind it seconds later, and a port the
    kernel hands out (bind to 0) can meanwhile become another process's outgoing connection."""
    import random
    import socket

    for port in random.Random(os.getpid()).sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-31999")


def test_precision_auto_follows_the_cpu(data, tmp_path):
    from rwkv_dist.train.hardware import cpu_has_native_bf16

    native, feature = cpu_has_native_bf16()
    done = train(data, tmp_path / "auto", 1, "precision=auto", "schedule.steps=1", "optimizer.warmup_steps=0")
    chosen, why = re.search(r"precision (bf16|fp32) \((auto: [^)]*)", done.stdout).groups()
    assert feature in why and (chosen == "fp32" if not native else "measured" in why)  # flags, then timing
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["precision"] == chosen


def test_ddp_bf16_export_takes_the_fp32_master_weights(data, tmp_path):
    from rwkv_dist.train.checkpoint import load_checked

    run = tmp_path / "ddp-bf16"
    train(data, run, 1, "parallel.strategy=ddp", "precision=bf16", "schedule.steps=2")
    # its optimizer state is laid out for one rank: resuming on two is refused in one line, before any step
    done = subprocess.run(launch(tiny(data, run, 2, "parallel.strategy=ddp", "precision=bf16", "schedule.steps=3"), 2),
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "a bf16 ddp checkpoint resumes only on 1 rank(s), this run has 2" in done.stderr
    masters = weights(run)
    folder = CheckpointStore(run / "checkpoints").committed()[-1]
    module = load_checked(next(folder.glob("mp_rank_*_model_states.pt")))["module"]
    assert module["blocks.0.att.key.weight"].dtype == torch.bfloat16
    for name, w in module.items():
        assert masters[name].dtype == torch.float32
        assert torch.equal(masters[name].to(torch.bfloat16), w), name  # the bf16 weights are the masters rounded
    assert any(not torch.equal(masters[n], module[n].float()) for n in module)  # and the masters carry more bits
