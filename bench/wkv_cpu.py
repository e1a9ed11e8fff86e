"""Speed of the OpenMP CPU WKV kernel (forward + backward) against the naive per-step PyTorch loop, in one process.

    .venv/bin/python bench/wkv_cpu.py [--B 8 --T 1024 --C 512] [--repeat 3]

The naive loop is rwkv_dist.ops' reference backend: the stable recurrence one time step at a time, differentiated by
autograd (what HF transformers runs on CPU). Both use torch's default thread count. Prints medians and the ratio.
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


def timed(fn, repeat: int) -> float:
    fn()  # warm-up (and the kernel's JIT build on first use)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--C", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    w = -torch.exp(torch.randn(args.C, generator=g))
    u = torch.randn(args.C, generator=g) * 0.5
    k, v, gy = (torch.randn(args.B, args.T, args.C, generator=g) for _ in range(3))
    leaves = [x.requires_grad_() for x in (w, u, k, v)]

    results = {}
    for backend in ("cpu", "reference"):
        def forward(backend=backend):
            with torch.no_grad():
                wkv4(*leaves, backend=backend)

        def forward_backward(backend=backend):
            y, _ = wkv4(*leaves, backend=backend)
            torch.autograd.grad(y, leaves, gy)

        repeat = args.repeat if backend == "cpu" else 1
        results[backend] = (timed(forward, repeat), timed(forward_backward, repeat))

    elements = args.B * args.T * args.C
    print(f"WKV fp32 B={args.B} T={args.T} C={args.C} ({elements / 1e6:.1f}M elements), {torch.get_num_threads()} threads")
    print(f"{'':28s}{'forward':>12s}{'fwd+bwd':>12s}")
    for name, label in (("cpu", "OpenMP kernel (rwkv_dist)"), ("reference", "naive per-step loop")):
        fwd, both = results[name]
        print(f"{label:28s}{fwd * 1e3:10.1f}ms{both * 1e3:10.1f}ms")
    (fk, bk), (fn, bn) = results["cpu"], results["reference"]
    print(f"{'ratio (naive / kernel)':28s}{fn / fk:11.1f}x{bn / bk:11.1f}x")
    print(f"kernel fwd+bwd: {elements / bk / 1e6:.0f}M elements/s")


if __name__ == "__main__":
    main()
