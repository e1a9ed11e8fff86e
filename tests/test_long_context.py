"""Long context, segmented: a window trains as segments that carry the model state, with the exact (full BPTT)
gradient and the activation memory of one segment; through the trainer under zero3 (with activation checkpointing)
and ddp; bad segment lengths are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rwkv_dist.model import RWKVConfig
from rwkv_dist.parallel.common import training_loss
from rwkv_dist.train.segmented import SegmentedRWKV

from helpers import assert_redone_steps_are_bitwise, assert_same_training, assert_trains_like, assert_train_refuses, launch, losses, random_model, records, tiny, train, weights

L2WRAP = type("Loss", (), {"l2wrap": True})()


def gradients(model, x, y, segmented: bool):
    loss, objective = model(x, y) if segmented else training_loss(L2WRAP, model(x), y)
    objective.backward()
    return loss.item(), {n: p.grad.double() for n, p in model.named_parameters()}


@pytest.mark.parametrize("ctx, segment", [(4096, 256), (32, 1)])
def test_segmented_loss_and_every_gradient_equal_the_whole_window(ctx, segment):
    cfg = RWKVConfig(n_layer=2, n_embd=32, vocab_size=64, ctx_len=ctx)
    dense = random_model(**cfg.model_dump())
    seg = SegmentedRWKV(cfg, segment)
    seg.load_state_dict(dense.state_dict())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 64, (2, ctx), generator=g), torch.randint(0, 64, (2, ctx), generator=g)
    ref_loss, ref = gradients(dense, x, y, segmented=False)
    got_loss, got = gradients(seg, x, y, segmented=True)
    assert got_loss == pytest.approx(ref_loss, rel=1e-5)
    for name in ref:  # the state's gradient reaches the first segment's parameters through every boundary
        scale = ref[name].abs().max()
        assert scale > 0, name
        assert (got[name] - ref[name]).abs().max() <= 1e-5 * scale, name


def test_segmented_bf16_is_as_close_to_fp32_as_the_whole_window():
    """In bf16 the parameters' gradients are accumulated in bf16 (one partial per segment here): against the fp32
    gradient, the segmented bf16 one errs no more than twice as much as the whole window's bf16 one."""
    cfg = RWKVConfig(n_layer=2, n_embd=32, vocab_size=64, ctx_len=512)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 64, (2, 512), generator=g), torch.randint(0, 64, (2, 512), generator=g)
    fp32 = random_model(**cfg.model_dump())
    ref_loss, ref = gradients(fp32, x, y, segmented=False)
    whole_loss, whole = gradients(random_model(**cfg.model_dump()).to(torch.bfloat16), x, y, segmented=False)
    seg = SegmentedRWKV(cfg, 64).to(torch.bfloat16)
    seg.load_state_dict(random_model(**cfg.model_dump()).to(torch.bfloat16).state_dict())
    got_loss, got = gradients(seg, x, y, segmented=True)
    assert abs(got_loss - ref_loss) <= 2 * abs(whole_loss - ref_loss) + 1e-3
    for name in ref:
        err = (got[name] - ref[name]).abs().max()
        assert err <= 2 * (whole[name] - ref[name]).abs().max() + 1e-3 * ref[name].abs().max(), name


PEAK = """
import json, sys, torch
from rwkv_dist.model import RWKV, RWKVConfig
from rwkv_dist.parallel.common import training_loss
from rwkv_dist.train.segmented import SegmentedRWKV
ctx, segment = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
cfg = RWKVConfig(n_layer=2, n_embd=256, vocab_size=256, ctx_len=ctx)
model = SegmentedRWKV(cfg, segment) if segment else RWKV(cfg)
x, y = torch.randint(0, 256, (1, ctx)), torch.randint(0, 256, (1, ctx))
def status(field):  # kB lines of /proc/self/status
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts again from now (the imports' is forgotten)
before = status("VmRSS:")
loss, objective = model(x, y) if segment else training_loss(type("L", (), {"l2wrap": True})(), model(x), y)
objective.backward()
print(json.dumps(status("VmHWM:") - before))
"""


def peak_bytes(ctx: int, segment: int) -> int:
    """The growth of a fresh process's peak RSS over one forward + backward (Linux: the high-water mark reset just
    before, /proc/self/clear_refs): activations and temporaries. glibc's
    malloc is held to a fixed mmap threshold: by default it raises the threshold as blocks are freed and then keeps
    freed memory in its heap, so the RSS would remember every segment's activations long after they are gone."""
    done = subprocess.run([sys.executable, "-c", PEAK, str(ctx), str(segment)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_activation_memory_is_that_of_one_segment():
    """Peak memory of a forward + backward (L2 D256) at ctx 2k, 8k and 32k with segment 512: flat (32k <= 1.3 x 2k),
    while the whole window's grows with ctx (the same measure sees activations: 8k >= 2.5 x 2k)."""
    segmented = {ctx: peak_bytes(ctx, 512) for ctx in (2048, 8192, 32768)}
    whole = {ctx: peak_bytes(ctx, 0) for ctx in (2048, 8192)}
    assert whole[8192] >= 2.5 * whole[2048], whole
    assert segmented[32768] <= 1.3 * segmented[2048], segmented
    assert segmented[8192] < 0.5 * whole[8192], (segmented, whole)


def test_segmented_training_through_the_trainer_equals_whole_windows(data, tmp_path):
    """6 steps at ctx 128: whole windows (1 process) against segments of 32 under zero3 on 2 ranks with activation
    checkpointing, and under ddp: the same losses, norms and weights."""
    out = {name: tmp_path / name for name in ("whole", "zero3", "ddp")}
    train(data, out["whole"], 1, "model.ctx_len=128")
    train(data, out["zero3"], 2, "model.ctx_len=128", "schedule.segment_len=32",
          "parallel.activation_checkpointing=true")
    train(data, out["ddp"], 1, "model.ctx_len=128", "schedule.segment_len=32", "parallel.strategy=ddp")
    ref = losses(out["whole"])
    assert sorted(ref) == list(range(1, 7)) and ref[6] < ref[1] - 0.5
    for name in ("zero3", "ddp"):
        assert losses(out[name]) == pytest.approx(ref, rel=1e-5), name
        assert [r["grad_norm"] for r in records(out[name])] == pytest.approx(
            [r["grad_norm"] for r in records(out["whole"])], rel=1e-5)
        assert_same_training(weights(out[name]), weights(out["whole"]))


@pytest.mark.parametrize("overrides, message", [
    (["model.ctx_len=128", "schedule.segment_len=48"], "schedule.segment_len (48) does not divide model.ctx_len (128)"),
    (["schedule.segment_len=0"], "schedule.segment_len"),
    (["model.ctx_len=128", "schedule.segment_len=32", "parallel.strategy=pipeline", "parallel.pipeline_stages=2"],
     "schedule.segment_len (32 < ctx_len 128) needs strategy zero3 or ddp"),
])
def test_bad_segment_lengths_are_one_line_errors(data, tmp_path, overrides, message):
    assert_train_refuses(data, tmp_path / "never", overrides, message)


def test_evaluation_in_segments_scores_the_whole_window(data):
    """rwkv-dist eval runs long windows in segments that carry the state: the same loss as one forward per window."""
    from rwkv_dist.inference import evaluate

    model = random_model(n_layer=2, n_embd=32, vocab_size=2048)
    whole, tokens = evaluate(model, data, ctx_len=256, batch_size=2, max_batches=2, segment_len=256)
    for segment in (64, 7):  # 7 does not divide 256: the last segment is shorter
        got, counted = evaluate(model, data, ctx_len=256, batch_size=2, max_batches=2, segment_len=segment)
        assert counted == tokens == 2 * 2 * 256 and got == pytest.approx(whole, rel=1e-6), segment


# -- context parallelism: a window split across ranks ----------------------------------------------------------------
def test_piece_summaries_combine_into_the_exact_state():
    """WKV over a window equals WKV over its second half from the state combined out of both halves' zero-state
    summaries (the rule each context rank folds its incoming state with)."""
    from rwkv_dist.ops import wkv4
    from rwkv_dist.parallel.context import combine

    g = torch.Generator().manual_seed(3)
    B, T, C = 2, 48, 8
    w = -torch.rand(C, generator=g).exp()
    u = torch.randn(C, generator=g)
    k, v = torch.randn(B, T, C, generator=g) * 2, torch.randn(B, T, C, generator=g)
    y, final = wkv4(w, u, k, v)
    thirds = [slice(0, 16), slice(16, 32), slice(32, 48)]
    summaries = [wkv4(w, u, k[:, s], v[:, s])[1] for s in thirds]
    incoming = combine(summaries[0], summaries[1], w, 16)
    y3, state = wkv4(w, u, k[:, 32:], v[:, 32:], incoming)
    torch.testing.assert_close(y3, y[:, 32:], rtol=1e-5, atol=1e-6)
    total = combine(incoming, summaries[2], w, 16)
    for got, want in zip((total, state), (final, final)):
        torch.testing.assert_close(got.a * got.p.exp(), want.a * want.p.exp(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.b * got.p.exp(), want.b * want.p.exp(), rtol=1e-5, atol=1e-6)


CP = ["model.ctx_len=64", "checkpoint.every_steps=3"]


@pytest.fixture(scope="session")
def cp_runs(data, tmp_path_factory):
    """The same 6 steps at ctx 64: 1 process; C=2 SIGKILLed after step 4 and resumed; C=4; C=2 x zero3 D=2."""
    from helpers import kill_all_at_step

    root = tmp_path_factory.mktemp("context")
    out = {name: root / name for name in ("one", "c2", "c4", "c2d2")}
    train(data, out["one"], 1, *CP, "schedule.grad_accum=2")
    args = tiny(data, out["c2"], 2, *CP, "schedule.grad_accum=2", "parallel.context=2")
    proc = subprocess.Popen(launch(args, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out["c2_killed_at"] = kill_all_at_step(proc, out["c2"], 4)
    train(data, out["c2"], 2, *CP, "schedule.grad_accum=2", "parallel.context=2", "checkpoint.resume=auto")
    train(data, out["c4"], 4, *CP, "schedule.grad_accum=2", "parallel.context=4")
    train(data, out["c2d2"], 4, *CP, "schedule.grad_accum=1", "parallel.context=2")
    return out


@pytest.mark.parametrize("name", ["c2", "c4", "c2d2"])
def test_context_parallel_runs_train_what_one_process_trains(cp_runs, name):
    assert_trains_like(cp_runs[name], cp_runs["one"], clipping=False)


def test_a_killed_context_parallel_run_resumes_bitwise(cp_runs):
    assert 4 <= cp_runs["c2_killed_at"] < 6, cp_runs["c2_killed_at"]
    assert_redone_steps_are_bitwise(cp_runs["c2"])


@pytest.mark.parametrize("overrides, env, message", [
    (["model.ctx_len=60", "parallel.context=8"], {}, "parallel.context (8) does not divide model.ctx_len (60)"),
    (["parallel.context=2"], {"WORLD_SIZE": "3"}, "parallel.context (2) does not divide the world size (3)"),
    (["parallel.context=2", "parallel.strategy=pipeline", "parallel.pipeline_stages=2"], {},
     "parallel.context (2) needs strategy zero3 or ddp"),
])
def test_bad_context_layouts_are_one_line_errors(data, tmp_path, overrides, env, message):
    assert_train_refuses(data, tmp_path / "never", overrides, message, env)


def test_the_loader_packs_and_resumes_64k_windows(data):
    """Windows of 65536 tokens run across many documents and shards (shards hold 100k tokens); a loader restored from
    the state after a window continues with exactly the next windows."""
    import json as _json

    from rwkv_dist.data import TokenLoader, load_manifest

    eod = load_manifest(data).tokenizer.eod_id
    make = lambda: TokenLoader(data, ctx_len=65536, batch_size=1, seed=4)  # noqa: E731
    stream = iter(make())
    reference = [next(stream) for _ in range(4)]
    for b in reference:
        assert b.inputs.shape == (1, 65536) and torch.equal(b.inputs[:, 1:], b.targets[:, :-1])
        assert int((b.inputs == eod).sum()) >= 1  # windows run across documents (the corpus has whole files)
    first = make()
    it = iter(first)
    next(it)
    state = _json.loads(_json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    again = iter(resumed)
    for want in reference[1:]:
        got = next(again)
        assert torch.equal(got.inputs, want.inputs) and torch.equal(got.targets, want.targets)


def test_generation_reads_a_long_prompt_in_segments(data):
    """A 3000-token prompt read in parallel mode in segments of 1024 carrying the state continues as when it is read
    in one piece (the same sampled tokens)."""
    from pathlib import Path

    from rwkv_dist.data import Tokenizer
    from rwkv_dist.inference import sample

    tok = Tokenizer(Path(data).parent / "tokenizer")
    model = random_model(n_layer=2, n_embd=32, vocab_size=2048)
    words = " ".join(f"def f{i}(x): return x + {i}" for i in range(400))
    prompt = tok.decode(tok.encode([words])[0][:3000])
    assert len(tok.encode([prompt])[0]) > 2048
    with torch.no_grad():
        whole = sample(model, tok, prompt, 16, seed=5, prefill_len=10**6)
        pieces = sample(model, tok, prompt, 16, seed=5, prefill_len=1024)
    assert pieces == whole and len(tok.encode([whole])[0]) >= 8


def test_checkpoints_written_before_the_new_parallel_fields_still_resume(cp_runs, data, tmp_path):
    """A run's checkpoints from before parallel.tensor / parallel.context existed resume: a missing field had its
    default."""
    import shutil

    import yaml

    out = tmp_path / "old"
    shutil.copytree(cp_runs["one"], out)
    for config in out.glob("checkpoints/step_*/config.yaml"):
        saved = yaml.safe_load(config.read_text())
        for field in ("tensor", "context"):
            saved["parallel"].pop(field)
        config.write_text(yaml.safe_dump(saved))
    train(data, out, 1, *CP, "schedule.grad_accum=2", "schedule.steps=7", "checkpoint.resume=auto")
    assert sorted(losses(out)) == list(range(1, 8))
