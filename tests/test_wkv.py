"""WKV operator: every backend against an independent float64 evaluation of the closed form
    WKV_t = (Σ_{i<t} e^{(t-1-i)w+k_i} v_i + e^{u+k_t} v_t) / (Σ_{i<t} e^{(t-1-i)w+k_i} + e^{u+k_t}).

The closed form sums e^{(t-1-i) w + k_i} over the whole prefix directly (O(T^2)), with no recurrence and no running
exponent, so it shares no code or structure with the kernels."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_dist.errors import ShapeError
from rwkv_dist.ops import WKVState, wkv4
from rwkv_dist.ops._build import _cpu_key

BIG_NEGATIVE = -1e30


def closed_form(w, u, k, v, a0, b0, p0):
    """float64 y [B,T,C] and the final state as (A/B, log B), from the definition.

    Terms of y_t: the incoming state (a0 e^{p0} decayed t steps), tokens i < t (decayed t-1-i steps), token t (bonus u).
    """
    w, u, k, v, a0, b0, p0 = (x.double() for x in (w, u, k, v, a0, b0, p0))
    B, T, C = k.shape
    t = torch.arange(T, dtype=torch.float64)[:, None, None]  # [T, 1, 1]
    i = torch.arange(T, dtype=torch.float64)[None, :, None]  # [1, T, 1]
    past = ((t - 1 - i) * w + k[:, None]).masked_fill(i >= t, BIG_NEGATIVE)  # [B, T(t), T(i), C]
    now = (u + k)[:, :, None]  # [B, T, 1, C]
    init = (p0[:, None, None] + t * w)  # [B, T, 1, C]
    logw = torch.cat((init, past, now), dim=2)
    num_val = torch.cat((a0[:, None, None].expand(B, T, 1, C), v[:, None].expand(B, T, T, C), v[:, :, None]), dim=2)
    den_val = torch.cat((b0[:, None, None].expand(B, T, 1, C), torch.ones(B, T, T + 1, C, dtype=torch.float64)), dim=2)
    m = logw.amax(dim=2, keepdim=True)
    e = torch.exp(logw - m)
    y = (e * num_val).sum(2) / (e * den_val).sum(2)
    # final state: the incoming one decayed T steps plus every token i decayed T-1-i steps
    idx = torch.arange(T, dtype=torch.float64)[:, None]
    logs = torch.cat(((p0 + T * w)[:, None], (T - 1 - idx) * w + k), dim=1)  # [B, T+1, C]
    mf = logs.amax(dim=1, keepdim=True)
    ef = torch.exp(logs - mf)
    num = (ef * torch.cat((a0[:, None], v), 1)).sum(1)
    den = (ef * torch.cat((b0[:, None], torch.ones_like(v)), 1)).sum(1)
    return y, num / den, mf[:, 0] + torch.log(den)


def leaf(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh copy that requires grad (never the caller's tensor, which the loss may also read)."""
    return x.detach().to(dtype or x.dtype).clone().requires_grad_()


def make_inputs(B, T, C, seed, k_scale=5.0, extreme=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    time_decay = torch.linspace(-9.0, 5.0, C)  # w from -1.2e-4 (almost no decay) to -148 (forgets at once)
    u = torch.randn(C, generator=g)
    k = torch.randn(B, T, C, generator=g) * k_scale
    if extreme:
        k[:, ::7] = 40.0 * torch.sign(torch.randn(B, len(range(0, T, 7)), C, generator=g))
    v = torch.randn(B, T, C, generator=g)
    state = (torch.randn(B, C, generator=g), torch.rand(B, C, generator=g) + 0.5, torch.randn(B, C, generator=g) * 3)
    return -torch.exp(time_decay), u, k.to(dtype), v.to(dtype), state


def invariant_loss(y, ratio, log_den, seed):
    """A loss that reads the state only through what it represents (A/B and log B), so the definition can compute it."""
    g = torch.Generator().manual_seed(seed + 1)
    r1 = torch.randn(y.shape, generator=g, dtype=torch.float64)
    r2 = torch.randn(ratio.shape, generator=g, dtype=torch.float64)
    r3 = torch.randn(ratio.shape, generator=g, dtype=torch.float64)
    return (y.double() * r1).sum() + (ratio.double() * r2).sum() + (log_den.double() * r3).sum()


def run_both(backend, B, T, C, seed, with_state):
    w, u, k, v, state = make_inputs(B, T, C, seed)
    leaves = [leaf(x) for x in (w, u, k, v, *state)]
    w_, u_, k_, v_, a0, b0, p0 = leaves
    y, s = wkv4(w_, u_, k_, v_, (a0, b0, p0) if with_state else None, backend=backend)
    loss = invariant_loss(y, s.a / s.b, torch.log(s.b) + s.p, seed)
    grads = torch.autograd.grad(loss, leaves if with_state else leaves[:4])

    ref_leaves = [leaf(x, torch.float64) for x in (w, u, k, v, *state)]
    if not with_state:
        ref_leaves[4:] = [torch.zeros(B, C, dtype=torch.float64), torch.zeros(B, C, dtype=torch.float64),
                          torch.full((B, C), -1e300, dtype=torch.float64)]
    y_ref, ratio_ref, logden_ref = closed_form(*ref_leaves)
    loss_ref = invariant_loss(y_ref, ratio_ref, logden_ref, seed)
    ref_grads = torch.autograd.grad(loss_ref, ref_leaves if with_state else ref_leaves[:4])
    return (y, s.a / s.b, torch.log(s.b) + s.p, grads), (y_ref, ratio_ref, logden_ref, ref_grads)


def assert_close(actual, expected, rtol, what, atol=1e-7):
    """Max error relative to the largest expected magnitude (a gradient that is ~0 everywhere gets the atol floor)."""
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * scale + atol, f"{what}: max abs error {err:.3e} vs scale {scale:.3e} (rtol {rtol})"


NAMES = ("w", "u", "k", "v", "state.a", "state.b", "state.p")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("T", [1, 2, 31, 32, 33, 100])
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_and_gradients_match_closed_form(backend, T, with_state):
    (y, ratio, logden, grads), (y_ref, ratio_ref, logden_ref, ref_grads) = run_both(backend, 2, T, 12, T, with_state)
    assert_close(y, y_ref, 2e-5, "y")
    assert_close(ratio, ratio_ref, 5e-5, "state A/B")
    assert_close(logden, logden_ref, 1e-5, "state log B")
    for name, g, g_ref in zip(NAMES, grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert_close(g, g_ref, 1e-4, f"d/d{name}")


def test_long_sequence_matches_closed_form():
    """T = 2048. Errors grow like T * 2^-24 from fp32 sums of thousands of terms (the official kernel's arithmetic too),
    so the tolerance is wider than for short sequences."""
    (y, ratio, logden, grads), (y_ref, ratio_ref, logden_ref, ref_grads) = run_both("cpu", 1, 2048, 6, 7, True)
    assert_close(y, y_ref, 2e-4, "y")
    assert_close(ratio, ratio_ref, 3e-4, "state A/B")
    assert_close(logden, logden_ref, 1e-4, "state log B")
    for name, g, g_ref in zip(NAMES, grads, ref_grads):
        assert_close(g, g_ref, 5e-4, f"d/d{name}")


def test_very_long_sequence_matches_float64_recurrence():
    """T = 8192 is far past any compile-time T_MAX. The loss reads the state as A/B: a loss on the raw (a, b, p) has a
    gradient that jumps where fp32 and fp64 round a near-tie of the running max differently."""
    w, u, k, v, _ = make_inputs(1, 8192, 4, 3)
    results = []
    for backend, dt in (("cpu", torch.float32), ("reference", torch.float64)):
        leaves = [leaf(x, dt) for x in (w, u, k, v)]
        y, s = wkv4(*leaves, backend=backend)
        results.append((y, torch.autograd.grad((y * v.to(dt)).sum() + (s.a / s.b).sum(), leaves)))
    (y, g), (y_ref, g_ref) = results
    assert_close(y, y_ref, 2e-3, "y")
    for name, a, b in zip(NAMES, g, g_ref):
        assert_close(a, b, 5e-3, f"d/d{name}")


def test_gradient_through_raw_exponent_follows_the_max_chain():
    """A loss reading the returned p itself (not only A and B) still gets the exact gradient of the scaled recurrence."""
    w, u, k, v, state = make_inputs(2, 45, 8, 11)
    results = []
    for backend, dt in (("cpu", torch.float32), ("reference", torch.float64)):
        leaves = [leaf(x, dt) for x in (w, u, k, v, *state)]
        y, s = wkv4(leaves[0], leaves[1], leaves[2], leaves[3], tuple(leaves[4:]), backend=backend)
        loss = y.sum() + (s.a * 0.3).sum() + (s.b * 0.2).sum() + (s.p * 0.7).sum()
        results.append(torch.autograd.grad(loss, leaves))
    for name, g, g_ref in zip(NAMES, *results):
        assert_close(g, g_ref, 1e-4, f"d/d{name}")


@pytest.mark.parametrize("cuts", [[1], [31, 32, 33], [5, 64, 1, 30]])
def test_segments_with_carried_state_equal_one_pass(cuts):
    w, u, k, v, _ = make_inputs(2, 150, 10, 5)
    leaves = [leaf(x) for x in (w, u, k, v)]
    y_full, s_full = wkv4(*leaves, backend="cpu")
    g_full = torch.autograd.grad((y_full * v).sum() + (s_full.a / s_full.b).sum(), leaves)

    leaves = [leaf(x) for x in (w, u, k, v)]
    bounds = [0, *torch.tensor(cuts).cumsum(0).tolist(), 150]
    state, ys = None, []
    for lo, hi in zip(bounds, bounds[1:]):
        y, state = wkv4(leaves[0], leaves[1], leaves[2][:, lo:hi], leaves[3][:, lo:hi], state, backend="cpu")
        ys.append(y)
    y_seg = torch.cat(ys, 1)
    g_seg = torch.autograd.grad((y_seg * v).sum() + (state.a / state.b).sum(), leaves)
    assert torch.equal(y_seg, y_full), "forward is the same arithmetic step by step, so it must be bit-identical"
    assert torch.equal(state.p, s_full.p) and torch.equal(state.a, s_full.a)
    for name, a, b in zip(NAMES, g_seg, g_full):
        assert_close(a, b, 1e-5, f"d/d{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_use_fp32_math(dtype):
    """bf16/fp16 k, v: the state is computed in fp32 (equal to fp32 inputs of the same values) and y is the
    fp32 result rounded once to the input dtype (ulp: 2^-8 relative for bf16, 2^-11 for fp16)."""
    w, u, k, v, _ = make_inputs(2, 300, 16, 9, k_scale=3.0, extreme=False)
    k, v = k.to(dtype), v.to(dtype)
    y_low, s_low = wkv4(w, u, k, v, backend="cpu")
    y32, s32 = wkv4(w, u, k.float(), v.float(), backend="cpu")
    assert y_low.dtype == dtype and s_low.a.dtype == torch.float32
    for name, a, b in zip(NAMES[4:], s_low, s32):  # same fp32 math; the compiler may vectorize each dtype differently
        assert_close(a, b, 1e-6, f"state.{name} ({dtype})", atol=0)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    # one rounding to the input dtype (half a spacing, <= ulp relative), or the other neighbour when the two fp32 paths
    # differ in the last bit (one spacing, <= 2 ulp); the atol covers fp16 subnormals
    assert ((y_low.float() - y32).abs() <= 2 * ulp * y32.abs() + 1e-7).all()

    leaves = [leaf(x) for x in (w, u, k, v)]
    y, _ = wkv4(*leaves, backend="cpu")
    g_low = torch.autograd.grad(y.float().sum(), leaves)
    leaves32 = [leaf(x, torch.float32) for x in (w, u, k, v)]
    g32 = torch.autograd.grad(wkv4(*leaves32, backend="cpu")[0].sum(), leaves32)
    for name, a, b in zip(NAMES, g_low, g32):
        assert a.dtype == (torch.float32 if name in "wu" else dtype)
        assert_close(a, b, 4 * ulp, f"d/d{name} ({dtype})")


def test_backends_agree_and_auto_picks_the_cpu_kernel():
    w, u, k, v, state = make_inputs(3, 70, 9, 13)
    y_cpu, s_cpu = wkv4(w, u, k, v, state, backend="cpu")
    y_auto, _ = wkv4(w, u, k, v, state)
    y_ref, s_ref = wkv4(w, u, k, v, state, backend="reference")
    assert torch.equal(y_auto, y_cpu)
    assert_close(y_cpu, y_ref, 1e-6, "cpu vs reference")
    assert_close(s_cpu.p, s_ref.p, 1e-6, "state p")


BAD_INPUTS = [
    (lambda w, u, k, v: (w, u, k[0], v[0], None), r"k must be \[B, T, C\]"),
    (lambda w, u, k, v: (w, u, k, v[:, :-1], None), "v has shape"),
    (lambda w, u, k, v: (w, u, k.long(), v.long(), None), "dtype"),
    (lambda w, u, k, v: (w, u, k, v.double(), None), "v has dtype"),
    (lambda w, u, k, v: (w[:-1], u, k, v, None), "w must have shape"),
    (lambda w, u, k, v: (w, u[None], k, v, None), "u must have shape"),
    (lambda w, u, k, v: (w, u, k[:, :0], v[:, :0], None), "empty dimension"),
    (lambda w, u, k, v: (w, u, k, v, WKVState.fresh(3, 4)), "state.a has shape"),
    (lambda w, u, k, v: (w, u, k, v, WKVState(*(x.half() for x in WKVState.fresh(2, 4)))), "must be float32"),
    (lambda w, u, k, v: (w, u, k, v, (1, 2)), "state must be"),
    (lambda w, u, k, v: (w, u, k.tolist(), v, None), "k must be a tensor"),
]


@pytest.mark.parametrize("make, message", BAD_INPUTS)
def test_bad_inputs_raise_one_clear_error(make, message):
    w, u, k, v, _ = make_inputs(2, 5, 4, 0)
    with pytest.raises(ShapeError, match=message):
        wkv4(*make(w, u, k, v))


def test_unknown_backend_and_float64_on_kernel_are_refused():
    w, u, k, v, _ = make_inputs(2, 5, 4, 0)
    with pytest.raises(ShapeError, match="unknown backend 'tpu'"):
        wkv4(w, u, k, v, backend="tpu")
    with pytest.raises(ShapeError, match="float64 inputs run only on the reference"):
        wkv4(w, u, k.double(), v.double(), backend="cpu")
    with pytest.raises(ShapeError, match="needs CUDA tensors"):
        wkv4(w, u, k, v, backend="cuda")


def test_non_finite_inputs_propagate():
    """A NaN or inf coming in must come out (the CPU kernel is built without -ffinite-math-only for this), so that the
    trainer's non-finite guards see it."""
    w, u, k, v, _ = make_inputs(2, 40, 8, 1)
    for bad in (float("nan"), float("inf")):
        kk, vv = k.clone(), v.clone()
        kk[1, 10, 3] = bad
        vv[0, 20, 5] = float("nan")
        leaves = [leaf(x) for x in (w, u, kk, vv)]
        y, s = wkv4(*leaves, backend="cpu")
        assert torch.isnan(y[0, 20:, 5]).all() and not torch.isfinite(y[1, 10:, 3]).any()
        assert torch.isfinite(y[0, :20]).all() and torch.isfinite(y[:, :, 0]).all()
        gk = torch.autograd.grad(y.sum(), leaves[2])[0]
        assert not torch.isfinite(gk[0, :21, 5]).all() and torch.isfinite(gk[:, :, 0]).all()


# The CPU kernel computes 64-channel tiles of 8-lane vectors and splits a row's tiles into groups when there are few
# batch rows (fewer than twice the threads); the cases above have C < 64 (ragged tiles only). C = 150 is two whole tiles
# and a ragged one of 22 lanes (8 + 8 + 6); with 2 threads B = 1 runs three one-tile groups per row, B = 3 two groups
# (1 and 2 tiles), B = 5 one group of all three.
@pytest.mark.parametrize("B", [1, 3, 5])
def test_wide_rows_match_closed_form(B):
    (y, ratio, logden, grads), (y_ref, ratio_ref, logden_ref, ref_grads) = run_both("cpu", B, 70, 150, 21 + B, True)
    assert_close(y, y_ref, 2e-5, "y")
    assert_close(ratio, ratio_ref, 5e-5, "state A/B")
    assert_close(logden, logden_ref, 1e-5, "state log B")
    for name, g, g_ref in zip(NAMES, grads, ref_grads):
        assert_close(g, g_ref, 1e-4, f"d/d{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_closed_form(dtype):
    """bf16/fp16 k, v are read (and y, dk, dv written) in their dtype by the kernel: against the float64 definition on
    the same rounded inputs, y is off by one rounding (<= 1 ulp relative) plus fp32 error; the gradients also see the
    cotangent of y rounded to the dtype, hence 4 ulp of each gradient's largest magnitude. C = 75: one whole tile and
    a ragged one."""
    B, T, C, seed = 2, 45, 75, 17
    w, u, k, v, state = make_inputs(B, T, C, seed, k_scale=3.0, dtype=dtype)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    leaves = [leaf(x) for x in (w, u, k, v, *state)]
    y, s = wkv4(leaves[0], leaves[1], leaves[2], leaves[3], tuple(leaves[4:]), backend="cpu")
    assert y.dtype == dtype
    loss = invariant_loss(y, s.a / s.b, torch.log(s.b) + s.p, seed)
    grads = torch.autograd.grad(loss, leaves)

    ref_leaves = [leaf(x, torch.float64) for x in (w, u, k, v, *state)]
    y_ref, ratio_ref, logden_ref = closed_form(*ref_leaves)
    ref_grads = torch.autograd.grad(invariant_loss(y_ref, ratio_ref, logden_ref, seed), ref_leaves)
    err = (y.double() - y_ref).abs()
    assert (err <= ulp * y_ref.abs() + 2e-5 * y_ref.abs().max()).all(), f"y: max error {err.max().item():.3e}"
    assert_close(s.a / s.b, ratio_ref, 5e-5, "state A/B")
    assert_close(torch.log(s.b) + s.p, logden_ref, 1e-5, "state log B")
    for name, g, g_ref in zip(NAMES, grads, ref_grads):
        assert g.dtype == (dtype if name in ("k", "v") else torch.float32), name
        assert_close(g, g_ref, 4 * ulp, f"d/d{name} ({dtype})")


CXX_WITHOUT_OPENMP = """#!/bin/sh
for arg in "$@"; do
    [ "$arg" = -fopenmp ] && { echo "error: unsupported option '-fopenmp'" >&2; exit 1; }
done
exec "${REAL_CXX:-c++}" "$@"
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 -march targets")
@pytest.mark.parametrize("build", ["avx2", "generic-without-openmp", "gcc11"])
def test_other_cpus_and_compilers_builds_match_closed_form(build, tmp_path):
    """The kernel is plain C++ on GCC vectors, compiled for the building CPU (-march=native, AVX-512 here) by its g++.
    Build it as the machines it targets would, and rerun the float64-reference tests of this file in a fresh
    interpreter (about 40 s each, mostly the build), with the decoder's matrix-vector kernel's (its int8 widening has an
    AVX2 path and a generic one) and the fused mixing ops':
    - avx2: for a CPU with only AVX2 (-march=x86-64-v3);
    - generic-without-openmp: nothing beyond SSE2 (-march=x86-64), by a compiler that rejects -fopenmp as Apple's clang
      does (g++ behind a wrapper that fails on the flag): _build.py retries without OpenMP, and those single-threaded
      kernels must pass the same tests;
    - gcc11: by GCC 11, Ubuntu 22.04's and RHEL 9's compiler, whose C++ has no _Float16 (fp16 storage converts through
      c10's routines there). .ci/run installs g++-11 where apt can; without it this case cannot run."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}  # what is cached must not stand in for a build
    if build == "avx2":
        env["RWKV_DIST_WKV_CPU_MARCH"] = "x86-64-v3"
    elif build == "generic-without-openmp":
        cxx = tmp_path / "c++-without-openmp"
        cxx.write_text(CXX_WITHOUT_OPENMP)
        cxx.chmod(0o755)
        env.update(CXX=str(cxx), REAL_CXX=os.environ.get("CXX", "c++"), RWKV_DIST_WKV_CPU_MARCH="x86-64")
    else:
        if shutil.which("g++-11") is None:
            pytest.skip("g++-11 is not installed (.ci/run installs it with apt where it can)")
        env["CXX"] = "g++-11"
    tests = ("(closed_form or non_finite or segments or low_precision or backends_agree or gemv_kernel or match_float64)"
             " and not reference and not long_seq and not builds_match")  # not this test (its name matches closed_form)
    others = ("test_decode.py", "test_mixing.py", "test_loss.py")
    files = [__file__, *(str(Path(__file__).with_name(name)) for name in others)]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", tests],
                          capture_output=True, text=True, env=env, timeout=900, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout, done.stdout[-2000:]
    # The kernels under test are the ones this build made (RWKV_DIST_CPU_KERNELS=require: no fallback stood in).
    assert env.get("RWKV_DIST_CPU_KERNELS") == "require"
    builds = [p.name for p in (tmp_path / "ext").iterdir()]
    want = {"avx2": "x86-64-v3", "generic-without-openmp": "x86-64-noomp", "gcc11": "native"}[build]
    assert any(name.endswith(_cpu_key(want)) and any((tmp_path / "ext" / name).glob("*.so")) for name in builds), builds
