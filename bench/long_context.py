"""Long-context training on CPU: time per token and peak memory of one training step (forward, loss, backward,
AdamW; fp32, batch 1) at ctx 1k, 4k, 16k and 64k, for RWKV-4 trained in segments of 1024 tokens carrying the state
(schedule.segment_len; exact full-BPTT gradients) and for the GPT baseline of bench/train_throughput.py (SDPA
attention, whole windows) at the lengths it fits. Each point runs in a fresh process, so its peak RSS is its own (glibc
held to a fixed mmap threshold: freed activations leave the RSS). Reports t/token(ctx) / t/token(1k) for each model;
RWKV's target is <= 1.2 at 64k: its cost per token does not grow with the context, GPT's attention does. Then the
step time of context parallelism (C=2, one window over 2 ranks) against one process at ctx 16k, through the trainer.

    python bench/long_context.py [--layers 4 --embd 256 --vocab 2048 --segment 1024 --gpt-max 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

POINT = r"""
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[1])
import torch.nn.functional as F
from rwkv_dist.model import RWKV, RWKVConfig
from rwkv_dist.train.segmented import SegmentedRWKV
from train_throughput import GPT
kind, ctx, L, D, V, seg = sys.argv[2], *map(int, sys.argv[3:8])
torch.manual_seed(0)
if kind == "rwkv":
    cfg = RWKVConfig(n_layer=L, n_embd=D, vocab_size=V, ctx_len=ctx)
    model = SegmentedRWKV(cfg, min(seg, ctx), use_l2wrap=False)
    loss_of = lambda x, y: model(x, y)[0]
else:
    model = GPT(L, D, V, ctx)
    loss_of = lambda x, y: F.cross_entropy(model(x).view(-1, V), y.reshape(-1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
data = torch.randint(0, V, (1, ctx + 1))
x, y = data[:, :-1], data[:, 1:]
times = []
for _ in range(2):  # a warm-up step, then the timed one
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss_of(x, y).backward()
    opt.step()
    times.append(time.perf_counter() - start)
print(json.dumps({"s_per_token": times[-1] / ctx, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def point(kind: str, ctx: int, args: argparse.Namespace) -> dict:
    done = subprocess.run([sys.executable, "-c", POINT, str(REPO / "bench"), kind, str(ctx), str(args.layers),
                           str(args.embd), str(args.vocab), str(args.segment)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536"})
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--segment", type=int, default=1024)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--gpt-max", type=int, default=16384, help="longest context the GPT baseline is run at")
    parser.add_argument("--cp-ctx", type=int, default=16384, help="context of the C=2 against 1 process comparison")
    args = parser.parse_args()
    print(f"L{args.layers} D{args.embd} V{args.vocab}, batch 1, fp32, RWKV in segments of {args.segment}; "
          f"threads {os.environ.get('OMP_NUM_THREADS', 'all')}\n")
    print(f"{'ctx':>7s} {'RWKV ms/ktok':>13s} {'vs 1k':>6s} {'RWKV peak MB':>13s} {'GPT ms/ktok':>12s} {'vs 1k':>6s} "
          f"{'GPT peak MB':>12s}")
    base: dict[str, float] = {}
    for ctx in args.contexts:
        cells = []
        for kind in ("rwkv", "gpt"):
            r = point(kind, ctx, args) if kind == "rwkv" or ctx <= args.gpt_max else {"error": "not run"}
            if "error" in r:
                cells.append(f"{'-':>13s} {'':>6s} {r['error'][:13]:>13s}")
                continue
            base.setdefault(kind, r["s_per_token"])
            cells.append(f"{r['s_per_token'] * 1e6:13.1f} {r['s_per_token'] / base[kind]:6.2f} "
                         f"{r['peak_rss'] / 2**20:13.0f}")
        print(f"{ctx:7d} " + " ".join(cells), flush=True)
    # context parallelism: one window split over 2 ranks against one process, the same global batch
    import tempfile

    sys.path.insert(0, str(REPO / "bench"))
    from pipeline import step_time, train  # bench/pipeline.py: the trainer runner and its step-time reader

    from rwkv_dist.demo import prepare_data

    ctx = args.cp_ctx
    with tempfile.TemporaryDirectory(dir=REPO / ".cache" if (REPO / ".cache").is_dir() else None) as tmp:
        root = Path(tmp)
        _, data = prepare_data(root / "corpus")
        run = argparse.Namespace(layers=args.layers, embd=args.embd, steps=4)
        common = [f"model.ctx_len={ctx}", "schedule.micro_batch_size=1", "schedule.global_batch_size=1",
                  "logging.val_batches=1"]
        one = step_time(train(root / "one", data, 1, run, *common), ctx)
        two = step_time(train(root / "c2", data, 2, run, *common, "parallel.context=2"), ctx)
    print(f"\ncontext parallel C=2 vs 1 process at ctx {ctx} (trainer, zero3, batch 1): step {two:.2f} s vs "
          f"{one:.2f} s = {two / one:.2f}x")


if __name__ == "__main__":
    main()
