"""The training loss on CPU: the trainer's fused cross-entropy kernel (csrc/loss_cpu.cpp) against torch's ops, in one
process, forward + backward over [tokens, vocab] logits.

    .venv/bin/python bench/loss.py [--tokens 8192] [--vocabs 2048 50277] [--dtypes fp32 bf16] [--rounds 7]

Contenders, all on the same logits and targets:
  kernel         rwkv_dist.train.loss.lm_loss with L2Wrap (what the trainer runs on CPU)
  torch lm_loss  the same function on its torch path (RWKV_DIST_LOSS_BACKEND=reference: what it ran before the kernel,
                 and still runs on CUDA)
  F.cross_entropy  torch's own (no L2Wrap), the usual baseline
Rounds alternate the contenders, after one warm-up each, under the trainer's allocator setting (freed memory kept);
medians are reported, with the bytes of logits the kernel moves per second (read twice, gradient written once).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from rwkv_dist.train.hardware import keep_freed_cpu_memory  # noqa: E402
from rwkv_dist.train.loss import lm_loss  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(loss_fn, logits: torch.Tensor, targets: torch.Tensor, backend: str) -> float:
    os.environ["RWKV_DIST_LOSS_BACKEND"] = backend
    leaf = logits.detach().requires_grad_()
    start = time.perf_counter()
    loss_fn(leaf, targets).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[2048, 50277])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    keep_freed_cpu_memory()
    contenders = {
        "kernel": (lambda x, t: lm_loss(x, t), "auto"),
        "torch lm_loss": (lambda x, t: lm_loss(x, t), "reference"),
        "F.cross_entropy": (lambda x, t: F.cross_entropy(x.float(), t), "auto"),
    }
    print(f"Loss forward + backward on CPU, {torch.get_num_threads()} threads, {args.tokens} tokens, "
          f"median of {args.rounds} alternating rounds")
    print(f"{'vocab':>7s}{'dtype':>6s}" + "".join(f"{name + ' ms':>19s}" for name in contenders)
          + f"{'torch lm_loss/kernel':>22s}{'F.ce/kernel':>13s}{'kernel GB/s':>13s}")
    for vocab in args.vocabs:
        for dtype_name in args.dtypes:
            g = torch.Generator().manual_seed(vocab)
            logits = (3 * torch.randn(args.tokens, vocab, generator=g)).to(DTYPES[dtype_name])
            targets = torch.randint(0, vocab, (args.tokens,), generator=g)
            times = {name: [] for name in contenders}
            for round_ in range(args.rounds + 1):
                for name, (fn, backend) in contenders.items():
                    seconds = timed(fn, logits, targets, backend)
                    if round_:  # round 0 warms up
                        times[name].append(seconds)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            moved = 3 * logits.numel() * logits.element_size()
            print(f"{vocab:7d}{dtype_name:>6s}" + "".join(f"{med[name] * 1e3:19.1f}" for name in contenders)
                  + f"{med['torch lm_loss'] / med['kernel']:21.2f}x{med['F.cross_entropy'] / med['kernel']:12.2f}x"
                  + f"{moved / med['kernel'] / 1e9:13.1f}")
    os.environ.pop("RWKV_DIST_LOSS_BACKEND", None)


if __name__ == "__main__":
    main()
