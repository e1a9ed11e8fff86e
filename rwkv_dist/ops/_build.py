"""JIT builds of the C++/CUDA WKV kernels in csrc/ through torch.utils.cpp_extension (cached in TORCH_EXTENSIONS_DIR)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"


def _cache_dir() -> str | None:
    # torch picks ~/.cache/torch_extensions by default; an explicit setting wins so tests and CI keep builds in the repo.
    return os.environ.get("TORCH_EXTENSIONS_DIR")


@functools.cache
def cpu_extension():
    """The OpenMP CPU kernel (csrc/wkv4_cpu.cpp); about 30 s to build the first time, then loaded from the cache."""
    from torch.utils.cpp_extension import load

    return load(
        name="rwkv_dist_wkv4_cpu",
        sources=[str(CSRC / "wkv4_cpu.cpp")],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O3", "-fopenmp", "-fno-math-errno"],
        extra_ldflags=["-fopenmp"],
        build_directory=_build_dir("rwkv_dist_wkv4_cpu"),
        verbose=False,
    )


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


def _build_dir(name: str) -> str | None:
    root = _cache_dir()
    if root is None:
        return None
    path = Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)
