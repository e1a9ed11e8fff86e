"""Speed of the fused CUDA WKV kernel (forward + backward) against a naive per-step PyTorch loop on the same GPU and
against the OpenMP CPU kernel.

    .venv/bin/python bench/wkv_cuda.py [--repeat 5]

The naive loop is rwkv_dist.ops' reference backend on CUDA tensors: the same stable recurrence, one step at a time,
differentiated by autograd (a few dozen small kernel launches per step). The CPU kernel runs on copies in host memory
with torch's default thread count. Cases: B=8 T=1024 C=512 in fp32 and bf16, and a long T=16384 (fp32) that no T_MAX
kernel would take. Times are medians over --repeat runs after one warm-up (the first call also JIT-builds the
extensions: a minute or two). GB/s: see fused_bytes().
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from rwkv_dist.ops import wkv4  # noqa: E402

CASES = [  # B, T, C, dtype
    (8, 1024, 512, torch.float32),
    (8, 1024, 512, torch.bfloat16),
    (8, 16384, 512, torch.float32),
]
NAIVE_MAX_T = 4096  # beyond this the naive loop gets a single timed run (it takes seconds)


def make_inputs(B, T, C, dtype, device):
    g = torch.Generator().manual_seed(0)
    w = -torch.exp(torch.randn(C, generator=g))
    u = torch.randn(C, generator=g) * 0.5
    k, v, gy = (torch.randn(B, T, C, generator=g) for _ in range(3))
    leaves = [x.to(device) for x in (w, u)] + [x.to(device, dtype) for x in (k, v)]
    return [x.requires_grad_() for x in leaves], gy.to(device, dtype)


def timed(fn, device: str, repeat: int) -> float:
    """Median wall time of fn() in seconds, synchronizing the GPU around each run."""
    def once():
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()  # warm-up: JIT build of the extension, allocator growth, first-launch costs
    return statistics.median(once() for _ in range(repeat))


def forward(backend, leaves):
    with torch.no_grad():
        wkv4(*leaves, backend=backend)


def forward_backward(backend, leaves, gy):
    y, _ = wkv4(*leaves, backend=backend)
    torch.autograd.grad(y, leaves, gy)


def fused_bytes(B, T, C, dtype) -> int:
    """Bytes read and written by fused forward + backward: k, v, y (3) then k and v twice, gy, gk, gv (7), per element
    of [B, T, C]; plus the fp32 checkpoints written once and read once. An upper bound on DRAM traffic (the backward's
    second read of a 32-step chunk of k, v mostly hits L2)."""
    elt = torch.tensor([], dtype=dtype).element_size()
    checkpoints = 3 * 4 * B * C * ((T + 31) // 32)
    return 10 * elt * B * T * C + 2 * checkpoints


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (median)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/wkv_cuda.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). Nothing measured.", file=sys.stderr)
        return 1

    print(f"GPU: {torch.cuda.get_device_name()}  CPU threads: {torch.get_num_threads()}  torch {torch.__version__}")
    header = (f"{'case':<26}{'fused fwd':>11}{'fused f+b':>11}{'GB/s f+b':>10}{'naive f+b':>11}{'cpu f+b':>10}"
              f"{'naive/fused':>13}{'cpu/fused':>11}")
    print(header)
    print("-" * len(header))
    for B, T, C, dtype in CASES:
        leaves, gy = make_inputs(B, T, C, dtype, "cuda")
        fwd = timed(lambda: forward("cuda", leaves), "cuda", args.repeat)
        fused = timed(lambda: forward_backward("cuda", leaves, gy), "cuda", args.repeat)
        naive_repeat = args.repeat if T <= NAIVE_MAX_T else 1
        naive = timed(lambda: forward_backward("reference", leaves, gy), "cuda", naive_repeat)
        cpu_leaves, cpu_gy = make_inputs(B, T, C, dtype, "cpu")
        cpu = timed(lambda: forward_backward("cpu", cpu_leaves, cpu_gy), "cpu", max(1, args.repeat // 2))
        gbps = fused_bytes(B, T, C, dtype) / fused / 1e9
        name = f"B{B} T{T} C{C} {str(dtype).removeprefix('torch.')}"
        print(f"{name:<26}{fwd * 1e3:>9.2f}ms{fused * 1e3:>9.2f}ms{gbps:>10.0f}{naive * 1e3:>9.0f}ms"
              f"{cpu * 1e3:>8.0f}ms{naive / fused:>12.0f}x{cpu / fused:>10.0f}x")
        del leaves, gy, cpu_leaves, cpu_gy
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
