"""Tensor parallelism (megatron-core layers, T=2) against one process and ZeRO-3 data parallelism on 2 ranks, on CPU
(gloo), for a model of D >= 512, the same global batch everywhere: per-rank model-state bytes (parameters + fp32
masters + Adam moments, from OUT/ranks/) and the median step time. Then the planner's table for RWKV-4 14B on
64 x 80 GB (A100) and 64 x 141 GB (H200).
On CPU a tensor-parallel step all-reduces activations over gloo twice per block forward and four times backward, while
ZeRO-3 moves parameters: read the ratios, not the absolute times.

    python bench/tensor_parallel.py [--layers 4 --embd 512 --steps 8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline import REPO, compare_layouts  # bench/pipeline.py: the same runner and table

from rwkv_dist.demo import prepare_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=REPO / ".cache" if (REPO / ".cache").is_dir() else None) as tmp:
        root = Path(tmp)
        _, data = prepare_data(root / "corpus")
        batch = ["schedule.micro_batch_size=4", "schedule.global_batch_size=8"]
        tokens = 8 * 64
        runs = {
            "1 process (zero3, accum 2)": (1, [*batch, "schedule.grad_accum=2"]),
            "zero3, 2 ranks": (2, [*batch, "schedule.grad_accum=1"]),
            "tensor parallel T=2": (2, [*batch, "schedule.grad_accum=2", "parallel.tensor=2"]),
        }
        compare_layouts(root, data, args, runs, tokens)
    for gpu in ("A100-80G", "H200"):
        print(f"\nrwkv-dist plan configs/train/rwkv4-14b-3d.yaml --gpus 64 --gpu {gpu}")
        subprocess.run([sys.executable, "-m", "rwkv_dist.cli", "plan", str(REPO / "configs/train/rwkv4-14b-3d.yaml"),
                        "--gpus", "64", "--gpu", gpu, "--rows", "6"], check=True)


if __name__ == "__main__":
    main()
