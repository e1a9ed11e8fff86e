"""Machines where csrc/'s CPU kernels cannot be built: no working compiler. The automatic backends fall back, after one
warning, to the pure-PyTorch ops (the same math), so a laptop without g++ still trains and decodes; asking for the CPU
kernel by name, or requiring the kernels (RWKV_DIST_CPU_KERNELS=require, as the tests do), gives one line naming the
compiler. (A compiler without OpenMP, and GCC 11, are tested in test_wkv.py: they build.) And the kernels compile for
ARM."""

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

from rwkv_dist.model.decode import Decoder
from rwkv_dist.ops._build import CPU_SOURCES

from helpers import random_model

REPO = Path(__file__).resolve().parents[1]

# Run where the compiler is /bin/false (as good as none) and the extension cache is empty: train one step's gradients,
# decode a step with fp32 and int8 weights, then ask for the CPU WKV kernel by name. Writes what it got to argv[1].
CHILD = r"""
import os, sys, warnings
import torch
sys.path.insert(0, "tests")
from helpers import random_model
from rwkv_dist import errors
from rwkv_dist.model.decode import Decoder
from rwkv_dist.ops.wkv import wkv4

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = random_model(n_layer=2, n_embd=32, vocab_size=64).train()
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    logits = model(tokens)
    logits.square().mean().backward()
    decoded = {w: Decoder(model, w).step(tokens[:, 0])[0] for w in ("fp32", "int8")}
build_warnings = [str(w.message) for w in caught if "could not build the CPU kernels" in str(w.message)]
try:
    wkv4(torch.zeros(4), torch.zeros(4), torch.zeros(1, 3, 4), torch.zeros(1, 3, 4), backend="cpu")
    named_error = None
except errors.KernelBuildError as exc:
    named_error = str(exc)
os.environ["RWKV_DIST_CPU_KERNELS"] = "require"  # and where the kernels are required, the model's forward says why
try:
    model(tokens)
    required_error = None
except errors.KernelBuildError as exc:
    required_error = str(exc)
torch.save({"logits": logits.detach(), "grads": {n: p.grad for n, p in model.named_parameters()},
            "decoded": decoded, "warnings": build_warnings, "error": named_error, "required": required_error},
           sys.argv[1])
"""


def test_without_a_compiler_training_and_decoding_fall_back_to_the_torch_ops(tmp_path):
    out = tmp_path / "got.pt"
    env = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "RWKV_DIST_WKV_BACKEND": "auto", "RWKV_DIST_MIX_BACKEND": "auto", "RWKV_DIST_CPU_KERNELS": "auto"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out, weights_only=True)

    # One warning for the whole process, one line, naming the compiler and what to do.
    assert len(got["warnings"]) == 1, got["warnings"]
    (warning,) = got["warnings"]
    assert "\n" not in warning and "'/bin/false'" in warning and "pure-PyTorch" in warning
    # Asking for the kernel by name is an error, one line, the same reason.
    assert got["error"] is not None and "\n" not in got["error"] and "'/bin/false'" in got["error"]
    assert "install g++" in got["error"]
    assert got["required"] == got["error"]  # RWKV_DIST_CPU_KERNELS=require: no fallback

    # The fallback computes what the kernels compute here (this process has them): logits, every gradient, decoding.
    model = random_model(n_layer=2, n_embd=32, vocab_size=64).train()
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    logits = model(tokens)
    logits.square().mean().backward()
    torch.testing.assert_close(got["logits"], logits.detach(), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    for weights, step_logits in got["decoded"].items():
        want = Decoder(model, weights).step(tokens[:, 0])[0]
        torch.testing.assert_close(step_logits, want, rtol=1e-5, atol=1e-5, msg=weights)


AARCH64_CXX = shutil.which("aarch64-linux-gnu-g++")


@pytest.mark.skipif(AARCH64_CXX is None, reason="no aarch64 cross compiler (.ci/run installs g++-aarch64-linux-gnu)")
def test_cpu_kernels_compile_for_arm(tmp_path):
    """ARM machines (Graviton, Ampere, Linux on Apple silicon) build the CPU kernels with -march=native too: GCC's C++
    there has no _Float16 (csrc/cpu_simd.h stores fp16 as __fp16). This machine cannot run ARM code, so each source is
    compiled for armv8-a against torch's headers with the flags _build.py gives (syntax and types; ~20 s)."""
    includes = [f"-I{path}" for path in (*cpp_extension.include_paths(), sysconfig.get_paths()["include"], REPO / "csrc")]
    flags = ["-std=c++17", "-fsyntax-only", "-O3", "-fopenmp", "-march=armv8-a", "-fno-math-errno",
             "-fno-trapping-math", "-DTORCH_EXTENSION_NAME=rwkv_dist_wkv4_cpu", *includes]
    jobs = {source: subprocess.Popen([AARCH64_CXX, *flags, str(REPO / "csrc" / source)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True) for source in CPU_SOURCES}
    failures = []
    for source, job in jobs.items():
        out, _ = job.communicate(timeout=300)
        errors_seen = [line for line in out.splitlines() if "error" in line]
        if job.returncode != 0 or errors_seen:
            failures.append(f"{source}: {job.returncode}\n" + "\n".join(errors_seen[:10] or out.splitlines()[-10:]))
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA torch builds the kernels (the GPU tests load them)")
def test_cuda_kernels_that_cannot_build_say_why_in_one_line():
    """A CPU build of torch cannot compile .cu sources, as a cluster node with a broken CUDA setup cannot: the error is
    one line naming nvcc and CUDA_HOME, and there is no silent fallback to the reference on the GPU."""
    from rwkv_dist import errors
    from rwkv_dist.ops._build import cuda_extension

    with pytest.raises(errors.KernelBuildError) as caught:
        cuda_extension()
    message = str(caught.value)
    assert "\n" not in message and "CUDA kernels" in message and "CUDA_HOME=" in message, message
