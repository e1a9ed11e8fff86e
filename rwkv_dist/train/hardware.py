"""What the device can do: the precision to train in, and its peak FLOP/s (the denominator of MFU).

Precision `auto` trains in bf16 only where the device computes it natively: CUDA GPUs of compute capability >= 8.0
(Ampere and later) and x86 CPUs with AVX-512 BF16 or AMX whose bf16 matmul, timed beside fp32 at start-up, is the faster
of the two. Elsewhere bf16 is emulated: on an AVX2-only CPU torch's bf16 matmul runs ~50x slower than fp32, so fp32 is
both faster and more exact there. The flags alone are not enough: a VM can report AVX-512 BF16 while the math
libraries are held to AVX2 (ONEDNN_MAX_CPU_ISA, an old oneDNN), and bf16 then runs at ~1/80 of fp32.

The peak comes from a datasheet table (dense, no sparsity; per precision) when the GPU is known, otherwise it is
measured: square matmuls of n = 512 .. 2048 in the run's dtype on the process's threads, the best rate of several timed
windows. A measurement can still understate the true peak; an MFU above 1 proves it did, and the
trainer then reports MFU as unknown rather than a number above 100%.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

BF16, FP32 = "bf16", "fp32"


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel; True if it took.

    glibc serves every allocation above 32 MiB (its largest mmap threshold) with a fresh mmap and unmaps it on free,
    and returns the free top of its heap once it exceeds a small trim threshold. A CPU training step allocates and
    frees activations of that size every step (at ctx 8192, D 256: [8192, 1024] fp32 hidden states of 33.5 MB,
    [8192, 2048] logits of 67 MB), so each step first-touches ~600 MB of new pages: ~150,000 page faults, each a
    kernel entry and a zeroed page. Measured on a 2-core EPYC VM, a 67 MB `x + 1` takes 20 ms on fresh pages and
    3 ms on reused ones, and an RWKV training step at ctx 8192 goes from 1.8 s to 1.35 s with no faults after its
    first step. So: no mmap for large blocks (they come from the heap and go back to its free lists) and a trim
    threshold of a quarter of the RAM (what a step frees is kept for the next; more than that still goes back).
    One process-wide setting: call it once per process before training; elsewhere than glibc it does nothing."""
    import ctypes
    import os
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
    libc = ctypes.CDLL(None)
    quarter_of_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    trim = min(quarter_of_ram, 2**31 - 1)  # mallopt takes an int
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim))


def cpu_has_native_bf16() -> tuple[bool, str]:
    """(native bf16 matmul on this CPU, the feature that decided it)."""
    checks = (("AMX", getattr(torch.cpu, "_is_amx_tile_supported", None)),
              ("AVX-512 BF16", getattr(torch.cpu, "_is_avx512_bf16_supported", None)))
    for name, probe in checks:
        if probe is not None and probe():
            return True, name
    return False, "no AVX-512 BF16 or AMX"


def cpu_bf16_speedup(n: int = 256, rounds: int = 3) -> float:
    """bf16 / fp32 matmul FLOP/s on this process's threads (n x n, ~0.2 s): > 1 where bf16 really is native. The
    rounds alternate the dtypes and keep each one's best, so that a burst of other work (at a run's start Ray's and
    the other ranks' processes share the cores) slows a window, not the answer: one fp32 window of a demo worker
    measured 20x slow once, and its 0.03x ratio came out 0.71x."""
    cpu = torch.device("cpu")
    best = {torch.bfloat16: 0.0, torch.float32: 0.0}
    for _ in range(rounds):
        for dtype in best:
            best[dtype] = max(best[dtype], measure_matmul_flops(cpu, dtype, sizes=(n,), window_s=0.02, windows=1)[0])
    return best[torch.bfloat16] / best[torch.float32]


def choose_precision(requested: str, device: torch.device, resumed: str | None = None) -> tuple[str, str]:
    """(bf16 | fp32, why). `resumed` is the precision of the checkpoint being resumed: `auto` keeps it, since a
    DeepSpeed checkpoint only loads into an engine of the same precision. On a CPU `auto` times matmuls: call it on
    one rank and share the answer (ranks timing at once share the cores, and could disagree)."""
    if requested != "auto":
        return requested, "set in the config"
    if resumed is not None:
        return resumed, "auto: the precision of the checkpoint being resumed"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major >= 8:
            return BF16, f"auto: {name} (compute capability {major}.{minor}) computes bf16 natively"
        return FP32, f"auto: {name} (compute capability {major}.{minor}) has no native bf16"
    native, feature = cpu_has_native_bf16()
    if native:
        speedup = cpu_bf16_speedup()
        if speedup > 1.0:
            return BF16, f"auto: this CPU has {feature}, native bf16 (bf16 matmul {speedup:.1f}x fp32, measured)"
        return FP32, (f"auto: this CPU reports {feature}, but its bf16 matmul ran at {speedup:.2f}x fp32 (measured; "
                      "the math library does not use it), so fp32")
    return FP32, f"auto: this CPU has {feature}; bf16 would be emulated (many times slower than fp32)"


@dataclass(frozen=True)
class GPUPeak:
    """Dense datasheet peaks in TFLOP/s: bf16/fp16 tensor cores (None: no native bf16), TF32, plain FP32."""

    label: str
    bf16: float | None
    tf32: float
    fp32: float
    fp16: float | None = None  # when it differs from bf16

    def tflops(self, dtype: torch.dtype, tf32_enabled: bool) -> float | None:
        if dtype == torch.bfloat16:
            return self.bf16
        if dtype == torch.float16:
            return self.fp16 or self.bf16
        return self.tf32 if tf32_enabled else self.fp32


# Matched in order against torch.cuda.get_device_name(): the more specific variants first (H100 NVL / PCIe before the
# SXM part, L40S before L40 before L4). Names as the driver reports them, e.g. "NVIDIA H100 80GB HBM3" (SXM),
# "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA L40S".
GPU_PEAKS: list[tuple[str, GPUPeak]] = [
    (r"H200 NVL", GPUPeak("H200 NVL", 835, 418, 60)),
    (r"H200|GH200", GPUPeak("H200 SXM", 989, 495, 67)),
    (r"H100 NVL", GPUPeak("H100 NVL", 835, 418, 60)),
    (r"H100 PCIe", GPUPeak("H100 PCIe", 756, 378, 51)),
    (r"H100", GPUPeak("H100 SXM", 989, 495, 67)),
    (r"A100.*40GB|A100-PCIE-40GB", GPUPeak("A100 40GB", 312, 156, 19.5)),
    (r"A100", GPUPeak("A100 80GB", 312, 156, 19.5)),
    (r"L40S", GPUPeak("L40S", 362, 183, 91.6)),
    (r"L40\b", GPUPeak("L40", 181, 90.5, 90.5)),
    (r"L4\b", GPUPeak("L4", 121, 60, 30.3)),
    (r"A10\b", GPUPeak("A10", 125, 62.5, 31.2)),
    (r"V100", GPUPeak("V100", None, 15.7, 15.7, fp16=125)),
    (r"RTX 4090", GPUPeak("RTX 4090", 165, 82.6, 82.6)),
    (r"RTX 3090", GPUPeak("RTX 3090", 71, 35.6, 35.6)),
]


def datasheet_peak(device_name: str, dtype: torch.dtype, tf32_enabled: bool = False) -> tuple[float, str] | None:
    """(FLOP/s, label) of a known GPU in `dtype`, or None (unknown GPU, or no native support for the dtype)."""
    for pattern, peak in GPU_PEAKS:
        if re.search(pattern, device_name):
            tflops = peak.tflops(dtype, tf32_enabled)
            if tflops is None:
                return None
            kind = "tf32" if dtype == torch.float32 and tf32_enabled else str(dtype).removeprefix("torch.")
            return tflops * 1e12, f"datasheet {peak.label} {kind} dense"
    return None


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...] = (512, 1024, 2048),
                         max_call_s: float = 0.1, window_s: float = 0.15, windows: int = 2) -> tuple[float, int]:
    """(best FLOP/s, its n) over n x n matmuls in `dtype` on the current threads. Small sizes sit in cache and pay
    the threads' synchronisation on every call, so the largest affordable sizes are tried too (a size whose single
    call exceeds max_call_s ends the search): the best rate seen is the device's reachable peak."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best, best_n = 0.0, sizes[0]
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm-up (kernel selection, page faults)
        sync()
        slowest_call = 0.0
        for _ in range(windows):
            calls, start = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - start < window_s:
                a @ b
                calls += 1
            sync()
            elapsed = time.perf_counter() - start
            slowest_call = max(slowest_call, elapsed / calls)
            if 2 * n**3 * calls / elapsed > best:
                best, best_n = 2 * n**3 * calls / elapsed, n
        if slowest_call > max_call_s:
            break
    return best, best_n


def detect_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device in the run's dtype, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = datasheet_peak(name, dtype, torch.backends.cuda.matmul.allow_tf32)
        if found is not None:
            return found[0], f"{found[1]} ({name})"
    flops, n = measure_matmul_flops(device, dtype)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return flops, f"measured {n}x{n} {str(dtype).removeprefix('torch.')} matmul{threads}"


def mfu(flops_per_token: float, tokens_per_s: float, devices: int, peak_flops: float) -> float | None:
    """Model FLOPs utilization; None when it would exceed 1 (the peak is then known to be wrong)."""
    value = flops_per_token * tokens_per_s / (devices * peak_flops)
    return value if value <= 1.0 else None
