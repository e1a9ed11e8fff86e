"""JIT builds of the C++/CUDA WKV kernels in csrc/ through torch.utils.cpp_extension (cached in TORCH_EXTENSIONS_DIR)."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"


def _cache_dir() -> str:
    # torch's default (~/.cache/torch_extensions); tests and CI point TORCH_EXTENSIONS_DIR into the repo's .cache/.

    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")


@functools.cache
def cpu_extension():
    """The OpenMP CPU kernels (csrc/wkv4_cpu.cpp: WKV; csrc/mix_cpu.cpp: a block's elementwise ops; csrc/gemv_cpu.cpp:
    decoding's matrix-vector products over fp32/bf16/int8 weights), one extension; about 15 s to build on 2 cores the
    first time (only wkv4_cpu.cpp includes torch's Python glue, see csrc/cpu_torch.h), then loaded from the cache.

    The kernel is written with explicit SIMD vectors (GCC vector extensions) and its own inlined exp, so it needs no
    -ffast-math; it must not have it: NaN/inf inputs have to propagate, which -ffinite-math-only would break.
    -march=native picks the widest instructions the CPU has for those vectors; RWKV_DIST_WKV_CPU_MARCH overrides it
    (e.g. x86-64-v3 for an AVX2-only build, x86-64 for plain SSE2; the tests build both). Native code is why the
    build folder is keyed by the CPU's feature flags and the -march, so a cache shared by different machines never
    loads code built for another CPU."""
    from torch.utils.cpp_extension import load

    march = os.environ.get("RWKV_DIST_WKV_CPU_MARCH", "native")
    name = "rwkv_dist_wkv4_cpu"
    return load(
        name=name,
        sources=[str(CSRC / "wkv4_cpu.cpp"), str(CSRC / "mix_cpu.cpp"), str(CSRC / "gemv_cpu.cpp")],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O3", "-fopenmp", f"-march={march}", "-fno-math-errno", "-fno-trapping-math"],
        extra_ldflags=["-fopenmp"],
        build_directory=_build_dir(f"{name}-{_cpu_key(march)}"),
        verbose=False,
    )


def _cpu_key(march: str = "native") -> str:
    flags = platform.machine() + march
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


@functools.cache
def cuda_extension():
    """The fused CUDA kernels (csrc/wkv4_cuda.cu + binding); needs a CUDA build of torch and nvcc."""
    from torch.utils.cpp_extension import load

    return load(
        name="rwkv_dist_wkv4_cuda",
        sources=[str(CSRC / "wkv4_cuda_binding.cpp"), str(CSRC / "wkv4_cuda.cu")],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--use_fast_math", "-Xptxas=-O3", "--extra-device-vectorization"],
        build_directory=_build_dir("rwkv_dist_wkv4_cuda"),
        verbose=False,
    )


def _build_dir(name: str) -> str:
    path = Path(_cache_dir()) / name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)
