"""Device facts the trainer relies on: the runtime dependencies, the precision `auto` picks, and the peak FLOP/s behind
MFU (the GPU datasheet keys; the CPU measurement itself)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
import tomllib
from importlib.metadata import packages_distributions

import pytest
import torch

from rwkv_dist.train.hardware import (choose_precision, cpu_bf16_speedup, cpu_has_native_bf16, datasheet_peak,
                                      detect_peak_flops, mfu)


def test_every_third_party_import_of_the_package_is_a_declared_dependency(repo):
    """`pip install -e .` (no extras) must give everything rwkv_dist/ imports, lazily imported modules included."""
    declared = set()
    for requirement in tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]:
        declared.add(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-"))
    modules = set()
    for path in (repo / "rwkv_dist").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = sorted(m for m in modules if m not in sys.stdlib_module_names and m != "rwkv_dist")
    assert {"torch", "deepspeed", "safetensors", "psutil"} <= set(third_party)  # the scan sees lazy imports too
    owners = packages_distributions()
    undeclared = {}
    for module in third_party:
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
        if not dists & declared:
            undeclared[module] = sorted(dists)
    assert not undeclared, f"imported by rwkv_dist/ but not in [project.dependencies]: {undeclared}"


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989), ("NVIDIA H100 PCIe", torch.bfloat16, 756),
    ("NVIDIA H100 NVL", torch.bfloat16, 835), ("NVIDIA H200", torch.bfloat16, 989),
    ("NVIDIA A100-SXM4-40GB", torch.bfloat16, 312), ("NVIDIA A100 80GB PCIe", torch.float32, 19.5),
    ("NVIDIA L4", torch.bfloat16, 121), ("NVIDIA L40", torch.bfloat16, 181), ("NVIDIA L40S", torch.bfloat16, 362),
    ("NVIDIA H100 80GB HBM3", torch.float32, 67), ("Tesla V100-SXM2-32GB", torch.float16, 125),
])
def test_gpu_datasheet_peaks_are_keyed_by_the_exact_part_and_dtype(name, dtype, tflops):
    peak, label = datasheet_peak(name, dtype)
    assert peak == pytest.approx(tflops * 1e12) and str(dtype).removeprefix("torch.") in label


def test_unknown_gpus_and_missing_dtypes_are_not_guessed():
    assert datasheet_peak("NVIDIA Some Future GPU", torch.bfloat16) is None
    assert datasheet_peak("Tesla V100-SXM2-32GB", torch.bfloat16) is None  # no native bf16: measure instead
    assert datasheet_peak("NVIDIA H100 80GB HBM3", torch.float32, tf32_enabled=True)[0] == pytest.approx(495e12)


def _large_matmul_flops(n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(3):
        start, calls = time.perf_counter(), 0
        while calls == 0 or time.perf_counter() - start < 0.2:
            a @ b
            calls += 1
        best = max(best, 2 * n**3 * calls / (time.perf_counter() - start))
    return best


def test_the_measured_cpu_peak_is_not_below_what_a_large_matmul_reaches():
    """The old probe (one small matmul) understated the peak ~2x, so MFU read above 100%. Other processes on the
    machine make any one timing noisy: the claim must hold in one of three paired tries."""
    tries = []
    for _ in range(3):
        peak, source = detect_peak_flops(torch.device("cpu"), torch.float32)
        best = _large_matmul_flops()
        tries.append((peak, best))
        if peak >= 0.8 * best:
            break
    else:
        raise AssertionError(f"detected peak below a 1024^2 matmul's throughput in every try: {tries}")
    assert f"{torch.get_num_threads()} threads" in source and "float32" in source


def test_mfu_above_one_is_unknown_not_a_number():
    assert mfu(1e9, 1e3, 1, 1e13) == pytest.approx(1e-1)
    assert mfu(1e9, 1e5, 1, 1e13) is None


def test_precision_auto_picks_native_bf16_only():
    native, feature = cpu_has_native_bf16()
    precision, why = choose_precision("auto", torch.device("cpu"))
    assert feature in why
    if native:  # the flags are confirmed by timing bf16 against fp32: bf16 only where it measured the faster
        assert "measured" in why and (precision == "bf16") == why.startswith(f"auto: this CPU has {feature}, native")
        assert 0 < cpu_bf16_speedup() < float("inf")
    else:
        assert precision == "fp32"
    assert choose_precision("bf16", torch.device("cpu")) == ("bf16", "set in the config")
    assert choose_precision("fp32", torch.device("cpu"))[0] == "fp32"
    assert choose_precision("auto", torch.device("cpu"), resumed="bf16")[0] == "bf16"  # a checkpoint keeps its own


def test_precision_auto_is_fp32_where_the_math_library_emulates_bf16():
    """A CPU whose flags say AVX-512 BF16 but whose oneDNN is held to AVX2 (as in some VMs and old builds) computes
    bf16 ~80x slower than fp32: `auto` must notice from the timing, not trust the flags. On a CPU without the flags
    the answer is fp32 for the flags' reason; either way never bf16."""
    script = ("import torch; from rwkv_dist.train.hardware import choose_precision; "
              "print(*choose_precision('auto', torch.device('cpu')), sep='|')")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    precision, why = out.stdout.strip().splitlines()[-1].split("|")
    assert precision == "fp32", why
    native, feature = cpu_has_native_bf16()
    assert (f"reports {feature}" in why and "measured" in why) if native else feature in why


# Page faults of allocating, filling and freeing a 64 MiB tensor (16,384 pages): the fewest of 16 rounds. The first
# rounds may still grow the heap (torch allocates 64-byte aligned, and an aligned request needs a little more than the
# block the previous round freed, until neighbours coalesce); a training step reaches the same steady state.
REALLOCATION_FAULTS = """
import resource, sys, torch
from rwkv_dist.train.hardware import keep_freed_cpu_memory
kept = sys.argv[1] == "keep" and keep_freed_cpu_memory()
counts = []
for round in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)
    del x
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, min(counts))
"""


@pytest.mark.skipif(sys.platform != "linux" or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only")
@pytest.mark.parametrize("mode", ["keep", "default"])
def test_freed_cpu_memory_is_reused_not_page_faulted_in_again(mode):
    """A training step frees and reallocates activations above glibc's 32 MiB mmap ceiling every step; by default
    each comes back as fresh pages (one fault per 4 KiB page), kept it is reused with no faults. The default case is
    the control: it shows the count measures what it should."""
    out = subprocess.run([sys.executable, "-c", REALLOCATION_FAULTS, mode], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    if mode == "keep":
        assert kept == "True" and int(faults) < 1000, out.stdout
    else:
        assert kept == "False" and int(faults) > 16_000, out.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_precision_auto_on_this_gpu():
    major, _ = torch.cuda.get_device_capability()
    assert choose_precision("auto", torch.device("cuda", 0))[0] == ("bf16" if major >= 8 else "fp32")
