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

from rwkv_dist.model import RWKV, RWKVConfig
from rwkv_dist.parallel.common import training_loss
from rwkv_dist.train.segmented import SegmentedRWKV

from helpers import assert_same_training, launch, losses, records, tiny, weights

L2WRAP = type("Loss", (), {"l2wrap": True})()


def noisy(cfg: RWKVConfig, dtype=torch.float32) -> RWKV:
    """The paper's init plus noise, so the zero-initialized matrices carry gradient through every path."""
    torch.manual_seed(0)
    model = RWKV(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if p.dim() == 2 else 0.2))
            if "time_mix" in name:
                p.clamp_(0, 1)
    return model.to(dtype)


def gradients(model, x, y, segmented: bool):
    loss, objective = model(x, y) if segmented else training_loss(L2WRAP, model(x), y)
    objective.backward()
    return loss.item(), {n: p.grad.double() for n, p in model.named_parameters()}


@pytest.mark.parametrize("ctx, segment", [(4096, 256), (32, 1)])
def test_segmented_loss_and_every_gradient_equal_the_whole_window(ctx, segment):
    cfg = RWKVConfig(n_layer=2, n_embd=32, vocab_size=64, ctx_len=ctx)
    dense = noisy(cfg)
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
    fp32 = noisy(cfg)
    ref_loss, ref = gradients(fp32, x, y, segmented=False)
    whole_loss, whole = gradients(noisy(cfg, torch.bfloat16), x, y, segmented=False)
    seg = SegmentedRWKV(cfg, 64).to(torch.bfloat16)
    seg.load_state_dict(noisy(cfg, torch.bfloat16).state_dict())
    got_loss, got = gradients(seg, x, y, segmented=True)
    assert abs(got_loss - ref_loss) <= 2 * abs(whole_loss - ref_loss) + 1e-3
    for name in ref:
        err = (got[name] - ref[name]).abs().max()
        assert err <= 2 * (whole[name] - ref[name]).abs().max() + 1e-3 * ref[name].abs().max(), name


PEAK = """
import json, resource, sys, torch
from rwkv_dist.model import RWKV, RWKVConfig
from rwkv_dist.parallel.common import training_loss
from rwkv_dist.train.segmented import SegmentedRWKV
ctx, segment = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
cfg = RWKVConfig(n_layer=2, n_embd=256, vocab_size=256, ctx_len=ctx)
model = SegmentedRWKV(cfg, segment) if segment else RWKV(cfg)
x, y = torch.randint(0, 256, (1, ctx)), torch.randint(0, 256, (1, ctx))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss, objective = model(x, y) if segment else training_loss(type("L", (), {"l2wrap": True})(), model(x), y)
objective.backward()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024))
"""


def peak_bytes(ctx: int, segment: int) -> int:
    """The growth of a fresh process's peak RSS over one forward + backward: activations and temporaries. glibc's
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


def run(data, out, procs, *overrides):
    done = subprocess.run(launch(tiny(data, out, procs, "model.ctx_len=128", *overrides), procs), capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def test_segmented_training_through_the_trainer_equals_whole_windows(data, tmp_path):
    """6 steps at ctx 128: whole windows (1 process) against segments of 32 under zero3 on 2 ranks with activation
    checkpointing, and under ddp: the same losses, norms and weights."""
    out = {name: tmp_path / name for name in ("whole", "zero3", "ddp")}
    run(data, out["whole"], 1)
    run(data, out["zero3"], 2, "schedule.segment_len=32", "parallel.activation_checkpointing=true")
    run(data, out["ddp"], 1, "schedule.segment_len=32", "parallel.strategy=ddp")
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
    out = tmp_path / "never"
    done = subprocess.run([sys.executable, "-m", "rwkv_dist.cli", "train", *tiny(data, out, 1, *overrides)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [x for x in done.stderr.splitlines() if "error:" in x]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]
    assert not out.exists()


def test_evaluation_in_segments_scores_the_whole_window(data):
    """rwkv-dist eval runs long windows in segments that carry the state: the same loss as one forward per window."""
    from rwkv_dist.inference import evaluate

    model = noisy(RWKVConfig(n_layer=2, n_embd=32, vocab_size=2048)).eval()
    whole, tokens = evaluate(model, data, ctx_len=256, batch_size=2, max_batches=2, segment_len=256)
    for segment in (64, 7):  # 7 does not divide 256: the last segment is shorter
        got, counted = evaluate(model, data, ctx_len=256, batch_size=2, max_batches=2, segment_len=segment)
        assert counted == tokens == 2 * 2 * 256 and got == pytest.approx(whole, rel=1e-6), segment
