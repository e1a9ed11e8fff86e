"""ZeRO-3 model-state memory per rank: the same training run on 1 and on 2 processes (gloo, CPU).

Model state = parameters + fp32 master copies + Adam moments held by a rank (what ZeRO-3 shards), as each rank reports
it in OUT/ranks/rank_*.json at the end of `rwkv-dist train`. Prints bytes per rank and the W=2 / W=1 ratio
(ideal 0.5; persistent small vectors and padding add a little).

    python bench/zero3_memory.py [--layers 4 --embd 256 --precision bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rwkv_dist.demo import DEMO_CONFIG, prepare_data  # noqa: E402


def run(world: int, out: Path, data: str, args: argparse.Namespace) -> list[dict]:
    overrides = [f"out_dir={out}", f"data.sources=[{{location: {data}}}]", f"data.val={data}", f"model.n_layer={args.layers}",
                 f"model.n_embd={args.embd}", "model.ctx_len=64", "schedule.steps=2", "optimizer.warmup_steps=0",
                 "schedule.micro_batch_size=2", "schedule.global_batch_size=4", f"schedule.grad_accum={2 // world}",
                 f"precision={args.precision}", "logging.peak_flops=1e12", "checkpoint.every_steps=1000",
                 f"parallel.persistence_threshold={args.persistence_threshold}"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
                if world > 1 else [sys.executable])
    subprocess.run([*launcher, "-m", "rwkv_dist.cli", "train", str(DEMO_CONFIG), *overrides], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank_*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--persistence-threshold", type=int, default=10_000)
    args = parser.parse_args()
    cache = REPO / ".cache"
    cache.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _, data = prepare_data(cache / "bench-demo-data")
        one = run(1, Path(tmp) / "w1", data, args)
        two = run(2, Path(tmp) / "w2", data, args)
    base = one[0]["model_state_bytes"]
    print(f"RWKV-4 L{args.layers} D{args.embd} ({one[0]['param_elements_total']:,} parameters), {args.precision}, "
          f"ZeRO-3 (persistence threshold {args.persistence_threshold})")
    print(f"{'world':>5} {'rank':>4} {'params held':>12} {'model-state bytes':>18} {'vs W=1':>7}")
    for rec in one + two:
        print(f"{rec['world_size']:>5} {rec['rank']:>4} {rec['param_elements_held']:>12,} {rec['model_state_bytes']:>18,} "
              f"{rec['model_state_bytes'] / base:>7.3f}")
    print(f"W=2 / W=1 per-rank model state: {max(r['model_state_bytes'] for r in two) / base:.3f} (target <= 0.55)")


if __name__ == "__main__":
    main()
