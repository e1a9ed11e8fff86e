"""Tensor parallelism (megatron-core layers inside the RWKV blocks) and the 3D layout, on real megatron-core, DeepSpeed
and gloo process groups: each layer equals the dense one, T=2 / T=2 x P=2 / T=2 x D=2 train what one process trains,
each rank holds its slice, a killed 3D run resumes bitwise, exports consolidate, and another layout continues from the
export; bad layouts are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_dist.model import RWKVConfig
from rwkv_dist.model.state_dict import load_rwkv

from helpers import (TRAIN_WORKER, assert_redone_steps_are_bitwise, assert_train_refuses, assert_trains_like,
                     kill_all_at_step, launch, losses, run_cli, train)
from helpers import tiny, weights

WORKER = Path(__file__).with_name("tp_layers_worker.py")
# the helpers' tiny model (L2 D64, vocabulary 2048), 8 sequences per step; checkpoints every 3 steps so a run killed
# after step 4 recomputes two steps
EVERY3 = "checkpoint.every_steps=3"


def layout(tensor: int, stages: int = 1, grad_accum: int = 1) -> list[str]:
    pipe = ["parallel.strategy=pipeline", f"parallel.pipeline_stages={stages}"] if stages > 1 else []
    return [f"parallel.tensor={tensor}", *pipe, f"schedule.grad_accum={grad_accum}", EVERY3]


@pytest.fixture(scope="session")
def tp_runs(data, tmp_path_factory) -> dict[str, Path]:
    """The same 6-step fp32 training: 1 process; T=2 (with the collective record and the engine's logits); T=2 x P=2
    SIGKILLed after step 4 and resumed with --resume auto; T=2 x D=2."""
    root = tmp_path_factory.mktemp("tensor")
    out = {name: root / name for name in ("one", "t2", "t2p2", "t2d2")}
    train(data, out["one"], 1, "schedule.grad_accum=2", EVERY3, script=TRAIN_WORKER)
    train(data, out["t2"], 2, *layout(2, grad_accum=2), script=TRAIN_WORKER)
    args = tiny(data, out["t2p2"], 4, *layout(2, stages=2, grad_accum=2))
    proc = subprocess.Popen(launch(args, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out["t2p2_killed_at"] = kill_all_at_step(proc, out["t2p2"], 4)
    train(data, out["t2p2"], 4, *layout(2, stages=2, grad_accum=2), "checkpoint.resume=auto")
    train(data, out["t2d2"], 4, *layout(2))
    return out


def test_each_tensor_parallel_layer_equals_the_dense_layer(tmp_path):
    """TimeMix, ChannelMix and embedding + head + loss (with L2Wrap) split over 2 ranks: outputs and every gradient
    against the dense layer in float64, within the dense float32 layer's own error (x2)."""
    report = tmp_path / "layers.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), str(report)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    errors = json.loads(report.read_text())
    assert set(errors) == {"time_mix", "channel_mix", "embedding_head_loss"}
    for layer, e in errors.items():
        assert e["tp"] <= max(2 * e["dense"], 1e-6), (layer, e)


@pytest.mark.parametrize("name", ["t2", "t2p2", "t2d2"])
def test_tensor_parallel_layouts_train_what_one_process_trains(tp_runs, name):
    assert_trains_like(tp_runs[name], tp_runs["one"])  # with clipping: its norm spans the tensor ranks (and stages)


def test_a_killed_3d_run_resumes_bitwise(tp_runs):
    """T=2 x P=2 killed by SIGKILL after step 4 (checkpoint at 3): the steps computed again after --resume auto have
    bitwise the losses and norms of their first computation (weights, Adam moments, data position all restored)."""
    assert 4 <= tp_runs["t2p2_killed_at"] < 6, tp_runs["t2p2_killed_at"]
    assert_redone_steps_are_bitwise(tp_runs["t2p2"])


def test_each_tensor_rank_holds_its_slice(tp_runs):
    from rwkv_dist.parallel.tensor import partition_dim

    cfg = RWKVConfig(n_layer=2, n_embd=64, vocab_size=2048)
    with torch.device("meta"):
        from rwkv_dist.model import RWKV

        dense = dict(RWKV(cfg, init=False).named_parameters())
    expected = sum(p.numel() // (2 if partition_dim(n) is not None else 1) for n, p in dense.items())
    one = json.loads((tp_runs["one"] / "ranks" / "rank_00000.json").read_text())
    held = [json.loads((tp_runs["t2"] / "ranks" / f"rank_{r:05d}.json").read_text()) for r in range(2)]
    assert one["param_elements_held"] == cfg.num_params()
    assert [h["param_elements_held"] for h in held] == [expected, expected]
    matrices = sum(p.numel() for p in dense.values() if p.dim() == 2)
    split = sum(p.numel() for n, p in dense.items() if p.dim() == 2 and partition_dim(n) is not None)
    assert (matrices - split / 2) / matrices < 0.52  # all matrices but ffn.receptance (replicated) are halved
    assert max(h["model_state_bytes"] for h in held) < 0.55 * one["model_state_bytes"]


@pytest.mark.parametrize("name, procs, stages, tensor", [("one", 1, 1, 1), ("t2", 2, 1, 2), ("t2p2", 4, 2, 2),
                                                         ("t2d2", 4, 1, 2)])
def test_the_planner_counts_the_bytes_each_rank_holds(tp_runs, data, name, procs, stages, tensor):
    from rwkv_dist.config import load_run_config
    from rwkv_dist.parallel.planner import model_state_bytes

    config, *overrides = tiny(data, tp_runs[name], 1)  # only the model and the ZeRO settings matter here
    cfg = load_run_config(config, overrides)
    measured = [json.loads(p.read_text())["model_state_bytes"] for p in sorted((tp_runs[name] / "ranks").glob("*"))]
    assert len(measured) == procs
    # the planner's busiest rank (the last stage, with the head, under the pipeline)
    assert model_state_bytes(cfg, stages, tensor, procs // (stages * tensor)) == max(measured)


def test_tensor_parallel_collectives_stay_on_the_run_device(tp_runs):
    for path in sorted((tp_runs["t2"] / "collectives").glob("rank_*.json")):
        seen = json.loads(path.read_text())
        files = {c["file"] for c in seen["calls"]}
        assert "parallel/tensor.py" in files, files  # L2Wrap's cross-rank maximum, gathering logits for eval
        for call in seen["calls"]:
            assert all(d == seen["device"] for d in call["devices"]), call


def test_exports_of_tensor_parallel_checkpoints_are_the_whole_model(tp_runs, tmp_path):
    # the consolidated T=2 checkpoint computes the logits the T=2 engine computed at the end of its run
    engine = torch.load(tp_runs["t2"] / "engine_logits.pt", weights_only=True)
    done = run_cli("export", tp_runs["t2"], "--format", "blinkdl", "--out", tmp_path / "t2.pth")
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        model = load_rwkv(torch.load(tmp_path / "t2.pth", weights_only=True), "t2")
        torch.testing.assert_close(model(engine["tokens"]), engine["logits"], rtol=0, atol=1e-5)
        # and the 3D (T=2 x P=2) export the one-process model's
        one = torch.load(tp_runs["one"] / "engine_logits.pt", weights_only=True)
        assert torch.equal(one["tokens"], engine["tokens"])
        done = run_cli("export", tp_runs["t2p2"], "--format", "blinkdl", "--out", tmp_path / "t2p2.pth")
        assert done.returncode == 0, done.stderr
        model = load_rwkv(torch.load(tmp_path / "t2p2.pth", weights_only=True), "t2p2")
        torch.testing.assert_close(model(one["tokens"]), one["logits"], rtol=1e-5, atol=1e-5)


def test_another_layout_continues_from_the_export(tp_runs, data, tmp_path):
    """The T=2 x P=2 run's export starts a zero3 run on 2 ranks (fresh optimizer): its first loss is the exported
    model's loss on that batch, far below a fresh model's, and it trains on."""
    pth = tmp_path / "t2p2.pth"
    assert run_cli("export", tp_runs["t2p2"], "--format", "blinkdl", "--out", pth).returncode == 0
    out = tmp_path / "continued"
    done = train(data, out, 2, f"checkpoint.init_from={pth}")
    assert "from the weights of" in done.stdout
    got, fresh = losses(out), losses(tp_runs["one"])
    assert sorted(got) == list(range(1, 7)) and got[1] < fresh[1] - 1.5
    assert all(torch.isfinite(t).all() for t in weights(out).values())


TP_ERRORS = [
    (["parallel.tensor=2"], {"WORLD_SIZE": "3"}, "parallel.tensor (2) does not divide the world size (3)"),
    (["parallel.tensor=3"], {}, "parallel.tensor (3) does not divide model.n_embd (64)"),
    (["parallel.tensor=2", "model.vocab_size=2049"], {}, "parallel.tensor (2) does not divide model.vocab_size (2049)"),
    (["parallel.tensor=2", "parallel.strategy=ddp"], {}, "parallel.tensor (2) needs strategy zero3 or pipeline"),
    (["checkpoint.init_from=/nonexistent/model.pth"], {}, "checkpoint.init_from: /nonexistent/model.pth"),
]


@pytest.mark.parametrize("overrides, env, message", TP_ERRORS)
def test_bad_tensor_parallel_requests_are_one_line_errors(data, tmp_path, overrides, env, message):
    assert_train_refuses(data, tmp_path / "never", overrides, message, env)
