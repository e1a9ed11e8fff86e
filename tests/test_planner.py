"""The layout planner: its memory accounting against hand counts and DeepSpeed's own ZeRO-3 estimator, its time model
against the published RWKV-4 14B run, and one-line errors for requests no cluster can serve. (Its per-rank bytes are
also checked against the bytes real CPU runs hold, in test_tensor_parallel.)"""

from __future__ import annotations

import json

import pytest

from rwkv_dist.cli import main
from rwkv_dist.config import load_run_config
from rwkv_dist.parallel.planner import GPUS, Cluster, Layout, estimate, model_state_bytes, plan, rank_share

FOURTEEN_B = "configs/train/rwkv4-14b.yaml"


def small(*overrides: str):
    from rwkv_dist.demo import DEMO_CONFIG

    return load_run_config(DEMO_CONFIG, ["model.n_layer=2", "model.n_embd=64", "parallel.persistence_threshold=0",
                                         "precision=fp32", *overrides])


def test_per_rank_elements_and_bytes_by_hand():
    cfg = small()
    D, V, F = 64, 2048, 256
    block = 4 * D * D + 2 * D * F + D * D + 11 * D  # matrices + ln1, ln2, time_* vectors
    dense = 2 * V * D + 2 * block + 2 * D + 2 * D  # + ln0 and ln_out
    assert sum(rank_share(cfg.model, 1, 1).elements) == dense == cfg.model.num_params()
    # T=2: everything but the layer norms, the five time_mix vectors and ChannelMix's receptance is halved
    replicated = 2 * (2 * D + 2 * D + 5 * D + D * D) + 2 * D + 2 * D
    assert sum(rank_share(cfg.model, 1, 2).elements) == replicated + (dense - replicated) // 2
    # fp32 ZeRO-3 keeps 4 (parameter) + 4 (master) + 8 (Adam) bytes per held element; 4 replicas hold a quarter each
    assert model_state_bytes(cfg, 1, 1, 1) == 16 * dense
    held = sum(-(-n // 4) for n in rank_share(cfg.model, 1, 1).elements)
    assert model_state_bytes(cfg, 1, 1, 4) == 16 * held


def test_zero3_memory_agrees_with_deepspeeds_estimator():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cfg = load_run_config(FOURTEEN_B, ["precision=bf16", "parallel.persistence_threshold=0"])
    cluster = Cluster(64, 8, GPUS["A100-80G"], 80)
    e = estimate(cfg, cluster, Layout(1, 1, 64, 4, 1, True, "none"))
    ours = (e.memory_gb["weights"] + e.memory_gb["grads"] + e.memory_gb["optimizer"]) * 1e9
    share = rank_share(cfg.model, 1, 1)
    _, theirs, _ = estimate_zero3_model_states_mem_needs(sum(share.elements), share.largest_layer, num_gpus_per_node=8,
                                                         num_nodes=8, cpu_offload=False)
    assert ours == pytest.approx(theirs, rel=1e-3)


def test_the_published_14b_run_is_predicted_within_25_percent():
    """RWKV-4 14B: 64 x A100-80G, ZeRO-2 data parallel, ctx 4096, activation checkpointing: 114K tokens/s reported
    (RWKV-LM README). Assumed: one 4096-token sequence per GPU per step."""
    cfg = load_run_config(FOURTEEN_B, ["model.ctx_len=4096", "schedule.global_batch_size=64",
                                       "schedule.micro_batch_size=1", "precision=bf16"])
    e = estimate(cfg, Cluster(64, 8, GPUS["A100-80G"], 80), Layout(1, 1, 64, 1, 1, True, "none", zero=2))
    assert e.fits
    assert e.tokens_per_s == pytest.approx(114_000, rel=0.25), e.tokens_per_s


def test_the_planner_recommends_a_fitting_layout_and_marks_the_rest():
    cfg = load_run_config(FOURTEEN_B, ["precision=bf16"])
    estimates, best = plan(cfg, Cluster(64, 8, GPUS["A100-40G"], 40))
    assert best.fits and best is max((e for e in estimates if e.fits), key=lambda e: e.tokens_per_s)
    assert any(not e.fits for e in estimates)  # e.g. no checkpointing at large micro-batches
    assert all(e.layout.tensor == 1 for e in estimates)  # the vocabulary (50277) is odd: no tensor split of it
    assert 0 < best.mfu < 0.7


def test_plan_cli_table_and_json(capsys):
    assert main(["plan", FOURTEEN_B, "model.vocab_size=50304", "--gpus", "16", "--gpu", "H200", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "recommended: parallel.pipeline_stages=" in out and "tokens/s" in out
    assert main(["plan", FOURTEEN_B, "model.vocab_size=50304", "--gpus", "16", "--gpu", "H200", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {row["T"] for row in report["layouts"]} == {1, 2, 4, 8}
    assert report["recommended"]["fits"] == "yes" and "assumptions" in report


@pytest.mark.parametrize("args, message", [
    (["--gpus", "64", "--tensor", "3"], "--tensor 3 does not divide --gpus 64"),
    (["--gpus", "64", "--tensor", "16"], "--tensor 16 spans nodes (--gpus-per-node 8)"),
    (["--gpus", "64", "--tensor", "2"], "--tensor 2 does not divide model.vocab_size (50277)"),
    (["--gpus", "64", "--pipeline", "64"], "--pipeline 64 exceeds model.n_layer (40)"),
    (["--gpus", "8", "--gpu", "A100-40G", "--gpu-mem", "1"], "no layout of 8 x A100 40GB SXM (1 GB) fits 14.15B"),
    (["--gpus", "8", "--gpu", "B300"], "--gpu B300: unknown GPU type"),
])
def test_bad_plan_requests_are_one_line_errors(capsys, args, message):
    assert main(["plan", FOURTEEN_B, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
