"""Speed of the OpenMP CPU WKV kernel (forward + backward) against the naive per-step PyTorch loop, in one process.

    .venv/bin/python bench/wkv_cpu.py [--B 8 --T 1024 --C 512] [--repeat 3]

The naive loop is rwkv_dist.ops' reference backend: the stable recurrence one time step at a time, differentiated by
autograd (what HF transformers runs on CPU). Both use torch's default thread count. Prints medians and the ratio, the
kernel with bf16 k/v (read and written as bf16, fp32 math), and what the numbers depend on: the CPU's SIMD flags,
torch's kernel capability (ATEN_CPU_CAPABILITY, which the loop runs on) and the -march the kernel was built for
(RWKV_DIST_WKV_CPU_MARCH, default native; x86-64-v3 gives the AVX2-only picture on a newer CPU).
Both run under the trainer's allocator setting (rwkv_dist.train.hardware.keep_freed_cpu_memory), as
bench/train_throughput.py does: with glibc's defaults each call page-faults its fresh [B, T, C] outputs in (~1-3k
faults, 2-7 ms of a ~13 ms kernel fwd+bwd here), which measures the allocator, not the kernel; --default-malloc
measures that way.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from rwkv_dist.ops import wkv4  # noqa: E402
from rwkv_dist.train.hardware import keep_freed_cpu_memory  # noqa: E402


def timed(fn, repeat: int) -> float:
    fn()  # warm-up (and the kernel's JIT build on first use)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_summary() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}; flags {' '.join(simd) or '-'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--C", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=7, help="timed calls of the kernel (the naive loop: one)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (the trainer and, by default, this bench keep it)")
    args = parser.parse_args()
    kept = not args.default_malloc and keep_freed_cpu_memory()
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

    low = [x.detach().to(torch.bfloat16).requires_grad_() if x.dim() == 3 else x for x in leaves]
    gy_low = gy.to(torch.bfloat16)

    def forward_bf16():
        with torch.no_grad():
            wkv4(*low, backend="cpu")

    def forward_backward_bf16():
        y, _ = wkv4(*low, backend="cpu")
        torch.autograd.grad(y, low, gy_low)

    results["bf16"] = (timed(forward_bf16, args.repeat), timed(forward_backward_bf16, args.repeat))

    elements = args.B * args.T * args.C
    malloc = "keeps freed memory (as the trainer)" if kept else "as glibc defaults"
    print(f"WKV fp32 B={args.B} T={args.T} C={args.C} ({elements / 1e6:.1f}M elements), {torch.get_num_threads()} "
          f"threads, median of {args.repeat} kernel calls, malloc {malloc}")
    print(f"CPU: {cpu_summary()}; torch capability {torch.backends.cpu.get_cpu_capability()}; "
          f"kernel -march={os.environ.get('RWKV_DIST_WKV_CPU_MARCH', 'native')}")
    print(f"{'':28s}{'forward':>12s}{'fwd+bwd':>12s}")
    for name, label in (("cpu", "OpenMP kernel (rwkv_dist)"), ("reference", "naive per-step loop"),
                        ("bf16", "OpenMP kernel, bf16 k/v")):
        fwd, both = results[name]
        print(f"{label:28s}{fwd * 1e3:10.1f}ms{both * 1e3:10.1f}ms")
    (fk, bk), (fn, bn) = results["cpu"], results["reference"]
    print(f"{'ratio (naive / kernel)':28s}{fn / fk:11.1f}x{bn / bk:11.1f}x")
    print(f"kernel fwd+bwd: {elements / bk / 1e6:.0f}M elements/s")


if __name__ == "__main__":
    main()
