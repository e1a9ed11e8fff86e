"""JIT builds of the C++/CUDA WKV kernels in csrc/ through torch.utils.cpp_extension (cached in TORCH_EXTENSIONS_DIR)."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

from .. import errors

CSRC = Path(__file__).resolve().parents[2] / "csrc"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels store; their math is fp32


def _cache_dir() -> str:
    # torch's default (~/.cache/torch_extensions); tests and CI point TORCH_EXTENSIONS_DIR into the repo's .cache/.

    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")


CPU_SOURCES = ("wkv4_cpu.cpp", "mix_cpu.cpp", "loss_cpu.cpp", "gemv_cpu.cpp")


def cpu_extension():
    """The OpenMP CPU kernels (csrc/wkv4_cpu.cpp: WKV; csrc/mix_cpu.cpp: a block's elementwise ops; csrc/loss_cpu.cpp:
    the cross-entropy loss; csrc/gemv_cpu.cpp: decoding's matrix-vector products over fp32/bf16/int8 weights), one
    extension; about 20 s to build on 2 cores the first time (only wkv4_cpu.cpp includes torch's Python glue, see
    csrc/cpu_torch.h), then loaded from the cache.
    Raises errors.KernelBuildError (one line) when it cannot be built; cpu_kernels_available() is the quiet test.

    The kernel is written with explicit SIMD vectors (GCC vector extensions) and its own inlined exp, so it needs no
    -ffast-math; it must not have it: NaN/inf inputs have to propagate, which -ffinite-math-only would break.
    -march=native picks the widest instructions the CPU has for those vectors; RWKV_DIST_WKV_CPU_MARCH overrides it
    (e.g. x86-64-v3 for an AVX2-only build, x86-64 for plain SSE2; the tests build both). Native code is why the
    build folder is keyed by the CPU's feature flags and the -march, so a cache shared by different machines never
    loads code built for another CPU.

    A compiler without OpenMP (Apple's clang rejects -fopenmp) still builds the kernels: when the OpenMP build fails
    it is retried without, and the kernels run on one thread (csrc guards every OpenMP call with _OPENMP).
    RWKV_DIST_CPU_OPENMP=0 asks for that build directly."""
    module, error = _cpu_build()
    if module is None:
        raise errors.KernelBuildError(error)
    return module


def cpu_kernels_available() -> bool:
    """Whether the CPU kernels build (or load from the cache) here. The first time they do not, warn once, naming the
    compiler's error: the automatic backends then run the pure-PyTorch ops in rwkv_dist/ops/ (the same math, tested
    against the same float64 references, and far slower: WKV steps through T in Python).
    RWKV_DIST_CPU_KERNELS=require makes a failed build an error instead (the tests set it: there a kernel that does not
    compile must fail, not hand its tests to the references they compare against)."""
    module, error = _cpu_build()
    if module is None and os.environ.get("RWKV_DIST_CPU_KERNELS", "auto") == "require":
        raise errors.KernelBuildError(error)
    if module is None:
        _warn_once(error)
    return module is not None


def cpu_kernel_takes(x: torch.Tensor, backend_variable: str) -> bool:
    """Whether a CPU kernel runs on x: a CPU tensor of a kernel dtype, `backend_variable` (an environment variable such
    as RWKV_DIST_MIX_BACKEND) not set to "reference", and the kernels built here (else, warned once, the torch ops)."""
    return (
        x.device.type == "cpu"
        and x.dtype in KERNEL_DTYPES
        and os.environ.get(backend_variable, "auto") != "reference"
        and cpu_kernels_available()
    )


@functools.cache
def _warn_once(error: str) -> None:
    warnings.warn(f"{error}; running the pure-PyTorch ops instead (correct, much slower)", RuntimeWarning, stacklevel=3)


@functools.cache
def _cpu_build():
    """(the loaded extension, None), or (None, a one-line reason) when neither the OpenMP build nor the plain one
    compiles. Cached for the process: a machine without a compiler pays the failed attempt once, not per call."""
    march = os.environ.get("RWKV_DIST_WKV_CPU_MARCH", "native")
    attempts = [False] if os.environ.get("RWKV_DIST_CPU_OPENMP", "1") == "0" else [True, False]
    first_error = None
    for openmp in attempts:
        try:
            return _load_cpu(march, openmp), None
        except Exception as exc:  # noqa: BLE001 -- a compiler's failure reaches us as any of several types
            first_error = first_error or exc
    compiler = os.environ.get("CXX", "c++")
    return None, (
        f"could not build the CPU kernels csrc/{{{','.join(CPU_SOURCES)}}} with {compiler!r} (-march={march}): "
        f"{_first_error_line(first_error)} (install g++, or set CXX; RWKV_DIST_BUILD_VERBOSE=1 prints the build log)"
    )


def _load_cpu(march: str, openmp: bool):
    return build_cpu_kernels(CSRC, "rwkv_dist_wkv4_cpu", march, openmp)


def build_cpu_kernels(source_dir: Path, name: str, march: str = "native", openmp: bool = True,
                      sources: tuple[str, ...] = CPU_SOURCES):
    """The CPU kernels built from `sources` in the csrc/ folder `source_dir` as the extension module `name`, in a build
    folder of their own: cpu_extension() builds the repository's; bench/kernel_ab.py also builds a baseline revision's
    (which may have fewer files), to time both in one process. Raises what the build raises."""
    from torch.utils.cpp_extension import load

    omp = ["-fopenmp"] if openmp else []
    return load(
        name=name,
        sources=[str(source_dir / source) for source in sources],
        extra_include_paths=[str(source_dir)],
        extra_cflags=["-O3", *omp, f"-march={march}", "-fno-math-errno", "-fno-trapping-math"],
        extra_ldflags=omp,
        build_directory=_build_dir(f"{name}-{_cpu_key(march + ('' if openmp else '-noomp'))}"),
        verbose=os.environ.get("RWKV_DIST_BUILD_VERBOSE") == "1",
    )


def _first_error_line(exc: BaseException) -> str:
    """The line of a build failure that says what went wrong (a compiler's 'error:' line, else the message's last
    line), cut to 200 characters: torch's own message holds the whole ninja log."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    said = [line for line in lines if "error" in line.lower() and not line.startswith("Error building extension")]
    line = (said or lines)[0 if said else -1]
    return line if len(line) <= 200 else line[:197] + "..."


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
    """The fused CUDA kernels (csrc/wkv4_cuda.cu + binding); needs a CUDA build of torch and nvcc. No fallback when
    they do not build: the reference would step through T in Python on the GPU, so a cluster would train at a
    fraction of its speed without noticing; errors.KernelBuildError says why in one line instead."""
    from torch.utils.cpp_extension import CUDA_HOME, load

    try:
        return load(
            name="rwkv_dist_wkv4_cuda",
            sources=[str(CSRC / "wkv4_cuda_binding.cpp"), str(CSRC / "wkv4_cuda.cu")],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "--use_fast_math", "-Xptxas=-O3", "--extra-device-vectorization"],
            build_directory=_build_dir("rwkv_dist_wkv4_cuda"),
            verbose=os.environ.get("RWKV_DIST_BUILD_VERBOSE") == "1",
        )
    except Exception as exc:  # noqa: BLE001 -- as in _cpu_build
        raise errors.KernelBuildError(
            f"could not build the CUDA kernels csrc/wkv4_cuda.cu with nvcc (CUDA_HOME={CUDA_HOME}): "
            f"{_first_error_line(exc)} (RWKV_DIST_BUILD_VERBOSE=1 prints the build log; "
            "RWKV_DIST_WKV_BACKEND=reference runs the slow reference instead)"
        ) from None


def _build_dir(name: str) -> str:
    path = Path(_cache_dir()) / name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)
