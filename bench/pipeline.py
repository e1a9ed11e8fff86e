"""Pipeline parallelism (ZeRO-3 inside every stage) against ZeRO-3 data parallelism and one process, on CPU (gloo).

Part 1, one model of >= 8 blocks, the same global batch everywhere:
    1 process (ZeRO-3, grad_accum 4) | zero3 on 4 ranks | pipeline P=2 x DP=2 (1F1B), parameters gathered per
    micro-batch and once per step
  per-rank model-state bytes (parameters + fp32 masters + Adam moments, from OUT/ranks/) and the median step time.
Part 2, the pipeline bubble: P=2 x DP=1 for m = P, 2P, 4P micro-batches per step; the measured idle share of the last
  stage (time blocked waiting for the other stage / step time, metrics.jsonl `pipeline_idle`) against the 1F1B
  schedule's (P-1)/(m+P-1).
Step times on a 2-core machine with 4 processes measure oversubscription as much as the strategies: read the ratios.

    python bench/pipeline.py [--layers 8 --embd 256 --steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rwkv_dist.demo import DEMO_CONFIG, prepare_data  # noqa: E402
from rwkv_dist.train.observe import read_metrics  # noqa: E402


def train(out: Path, data: str, world: int, args: argparse.Namespace, *overrides: str) -> list[dict]:
    common = [f"out_dir={out}", f"data.sources=[{{location: {data}}}]", f"data.val={data}", f"model.n_layer={args.layers}",
              f"model.n_embd={args.embd}", "model.ctx_len=64", f"schedule.steps={args.steps}", "optimizer.warmup_steps=0",
              "precision=fp32", "logging.peak_flops=1e12", "checkpoint.every_steps=1000", "logging.val_batches=1",
              "parallel.persistence_threshold=0", *overrides]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
                if world > 1 else [sys.executable])
    subprocess.run([*launcher, "-m", "rwkv_dist.cli", "train", str(DEMO_CONFIG), *common], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def held_bytes(out: Path) -> int:
    return max(json.loads(p.read_text())["model_state_bytes"] for p in (out / "ranks").glob("rank_*.json"))


def step_time(records: list[dict], tokens_per_step: int) -> float:
    return statistics.median(tokens_per_step / r["tokens_per_s"] for r in records[2:])


def compare_layouts(root: Path, data: str, args: argparse.Namespace, runs: dict, tokens: int) -> None:
    """Train each {name: (world, overrides)} run and print its per-rank model-state bytes and median step time against
    the first run's."""
    print(f"model L{args.layers} D{args.embd}, ctx 64, global batch 8, fp32, {args.steps} steps\n")
    print(f"{'layout':34s} {'model-state bytes/rank':>24s} {'vs first':>9s} {'step s':>8s} {'vs first':>9s}")
    base = None
    for i, (name, (world, overrides)) in enumerate(runs.items()):
        out = root / f"run{i}"
        recs = train(out, data, world, args, *overrides)
        state, t = held_bytes(out), step_time(recs, tokens)
        base = base or (state, t)
        print(f"{name:34s} {state:24,d} {state / base[0]:9.3f} {t:8.3f} {t / base[1]:9.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=REPO / ".cache" if (REPO / ".cache").is_dir() else None) as tmp:
        root = Path(tmp)
        _, data = prepare_data(root / "corpus")
        batch = ["schedule.micro_batch_size=2", "schedule.global_batch_size=8"]
        tokens = 8 * 64
        runs = {
            "1 process (zero3, accum 4)": (1, [*batch, "schedule.grad_accum=4"]),
            "zero3, 4 ranks": (4, [*batch, "schedule.grad_accum=1"]),
            "pipeline P=2 x DP=2, gather/micro": (4, [*batch, "schedule.grad_accum=2", "parallel.strategy=pipeline",
                                                      "parallel.pipeline_stages=2"]),
            "pipeline P=2 x DP=2, gather/step": (4, [*batch, "schedule.grad_accum=2", "parallel.strategy=pipeline",
                                                     "parallel.pipeline_stages=2", "parallel.pipeline_gather=step"]),
        }
        compare_layouts(root, data, args, runs, tokens)
        print("\npipeline bubble, P=2 x DP=1 (measured on the last stage vs (P-1)/(m+P-1))")
        print(f"{'m':>4s} {'measured idle':>14s} {'1F1B theory':>12s}")
        P = 2
        for m in (P, 2 * P, 4 * P):
            out = root / f"bubble{m}"
            recs = train(out, data, 2, args, "schedule.micro_batch_size=1", f"schedule.global_batch_size={m}",
                         f"schedule.grad_accum={m}", "parallel.strategy=pipeline", f"parallel.pipeline_stages={P}")
            idle = statistics.median(r["pipeline_idle"] for r in recs[2:])
            print(f"{m:4d} {idle:14.3f} {(P - 1) / (m + P - 1):12.3f}")


if __name__ == "__main__":
    main()
