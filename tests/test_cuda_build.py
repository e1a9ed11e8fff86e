"""The CUDA WKV extension compiles, links and imports without a GPU (CI has none).

torch.utils.cpp_extension refuses CUDA sources on a CPU build of torch, so this builds it by hand the way the JIT load
in rwkv_dist/ops/_build.py would on a GPU machine: nvcc for the kernels (sm_80 and sm_90, H100/H200 class), g++ for the
torch binding, one shared object linked against libtorch and libcudart, imported by a fresh CPU-torch interpreter.
About 35 s on 2 cores, nearly all of it g++ parsing torch/extension.h (nvcc runs alongside).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
NAME = "rwkv_dist_wkv4_cuda"  # what _build.cuda_extension() loads; PyInit_<NAME> must match


def _cuda_root() -> Path | None:
    """The toolkit folder holding bin/nvcc (None: no toolkit, the test skips)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    on_path = shutil.which("nvcc")
    if on_path:  # may be a wrapper script in /usr/local/bin; then the fixed candidates above find the toolkit
        candidates.append(str(Path(on_path).resolve().parents[1]))
    for root in filter(None, candidates):
        if (Path(root) / "bin" / "nvcc").is_file():
            return Path(root)
    return None


CUDA = _cuda_root()


def _cudart_dir(root: Path) -> Path:
    for sub in ("lib64", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib", "lib"):
        if (root / sub / "libcudart.so").exists():
            return root / sub
    pytest.fail(f"nvcc is at {root}/bin but libcudart.so is in none of its lib folders")


def _run_all(jobs: dict[str, list[str]]) -> None:
    """Run the compilers side by side (the g++ job dominates) and report every failure with its output."""
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in jobs.items()}
    failures = []
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures.append(f"{name} failed ({proc.returncode}):\n$ {' '.join(jobs[name])}\n{out[-6000:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.skipif(CUDA is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda, PATH)")
def test_cuda_extension_compiles_links_and_imports(tmp_path):
    kernels_o, binding_o, module = tmp_path / "wkv4_cuda.o", tmp_path / "binding.o", tmp_path / f"{NAME}.so"
    cudart = _cudart_dir(CUDA)
    torch_lib = Path(torch.__file__).parent / "lib"

    nvcc = [
        str(CUDA / "bin" / "nvcc"), "-c", str(CSRC / "wkv4_cuda.cu"), "-o", str(kernels_o), f"-I{CSRC}",
        "-Xcompiler", "-fPIC", "-std=c++17",
        # the flags _build.py gives nvcc, plus the half/bf16 guards torch's JIT build adds to every .cu
        "-O3", "--use_fast_math", "-Xptxas=-O3", "--extra-device-vectorization",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
    ]
    # -O0: this checks that the binding compiles and links, its speed is irrelevant (the kernels are in the .cu)
    gxx = [
        os.environ.get("CXX", "c++"), "-c", str(CSRC / "wkv4_cuda_binding.cpp"), "-o", str(binding_o),
        "-fPIC", "-std=c++20", "-O0", f"-DTORCH_EXTENSION_NAME={NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-I{CSRC}",
        *(f"-I{p}" for p in cpp_extension.include_paths()), f"-I{sysconfig.get_paths()['include']}",
    ]
    _run_all({"nvcc (wkv4_cuda.cu)": nvcc, "c++ (wkv4_cuda_binding.cpp)": gxx})

    link = [
        os.environ.get("CXX", "c++"), "-shared", str(binding_o), str(kernels_o), "-o", str(module),
        f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python", f"-L{cudart}", "-lcudart",
        f"-Wl,-rpath,{torch_lib}", f"-Wl,-rpath,{cudart}",
    ]
    _run_all({"link": link})

    # A fresh interpreter: the module must load next to CPU torch (Python dlopens with RTLD_NOW, so a launcher the
    # binding declares but the .cu does not define fails here) and refuse CPU tensors with a clear message before any
    # CUDA call (the launchers are only reached with CUDA tensors).
    probe = f"""
import importlib.util, torch
spec = importlib.util.spec_from_file_location({NAME!r}, {str(module)!r})
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
assert callable(m.forward) and callable(m.backward), dir(m)
assert m.checkpoint_every == 32, m.checkpoint_every
z = torch.zeros(1, 2, 4)
try:
    m.forward(torch.zeros(4), torch.zeros(4), z, z, torch.zeros(3, 1, 4), True, 0)
except RuntimeError as e:
    assert "must be a CUDA tensor" in str(e), e
else:
    raise AssertionError("forward accepted CPU tensors")
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
