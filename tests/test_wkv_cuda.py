"""The fused CUDA WKV kernel against the plain reference (and the CPU kernel for long T). Needs a GPU; skips without one.

Every case checks the forward output, the returned state (a, b, p) and the gradients of all inputs: w, u, k, v and the
incoming state, with random cotangents on y and on each state plane. T covers one step, the chunk edges of the
backward's checkpoints (31, 32, 33) and long sequences; B*C is chosen not to fill whole blocks of threads.
Tolerances (relative to the largest magnitude of each compared tensor):
  fp32 vs reference: 2e-4 (1e-3 for T >= 1000). The kernel uses the fast __expf and division (--use_fast_math) where
    the reference uses torch.exp, a few ulp apart per step.
  bf16 / fp16 vs the fp32 kernel on the same (rounded) inputs: math is fp32 inside, so y, dk, dv differ by one rounding
    to the storage dtype (rtol = its epsilon: 2^-8 bf16, 2^-11 fp16); the fp32 outputs (state, dw, du, d state) by 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from rwkv_dist.ops import EMPTY_EXPONENT, wkv4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CUDA WKV kernel)"),
]

NAMES = ("y", "a", "b", "p", "gw", "gu", "gk", "gv", "ga0", "gb0", "gp0")
LOW_PRECISION_EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@dataclass
class Case:
    inputs: tuple[torch.Tensor, ...]  # w, u, k, v, a0, b0, p0 (float32, CPU)
    cotangents: tuple[torch.Tensor, ...]  # for y, a, b, p


def make_case(B: int, T: int, C: int, *, extreme: bool, fresh: bool = False, seed: int = 0) -> Case:
    """Random inputs; `extreme`: |k| up to 40 and time_decay in [-9, 5] (w from -1.2e-4 to -148)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(*shape, lo, hi):
        return torch.empty(*shape).uniform_(lo, hi, generator=g)

    if extreme:
        time_decay, k, u = uniform(C, lo=-9, hi=5), uniform(B, T, C, lo=-40, hi=40), uniform(C, lo=-5, hi=5)
    else:
        time_decay, k, u = torch.randn(C, generator=g), torch.randn(B, T, C, generator=g), uniform(C, lo=-1, hi=1)
    w = -torch.exp(time_decay)
    v = torch.randn(B, T, C, generator=g)
    if fresh:
        a0, b0, p0 = torch.zeros(B, C), torch.zeros(B, C), torch.full((B, C), EMPTY_EXPONENT)
    else:  # a state some earlier segment could have left: b > 0, a / b a plausible output, p anywhere
        b0 = uniform(B, C, lo=0.5, hi=2.0)
        a0 = torch.randn(B, C, generator=g) * b0
        p0 = uniform(B, C, lo=-40, hi=40) if extreme else torch.randn(B, C, generator=g) * 3
    cot = (torch.randn(B, T, C, generator=g), *(torch.randn(B, C, generator=g) for _ in range(3)))
    return Case((w, u, k, v, a0, b0, p0), cot)


def run(backend: str, case: Case, dtype=torch.float32, device="cuda", segments=None, grad=True) -> dict:
    """Forward (optionally in segments carrying the state) and backward; every result as a float32 CPU tensor."""
    w, u, k, v, a0, b0, p0 = (x.to(device) for x in case.inputs)
    leaves = [x.detach().requires_grad_(grad) for x in (w, u, k.to(dtype), v.to(dtype), a0, b0, p0)]
    w, u, k, v, *state = leaves
    T = k.shape[1]
    bounds = [0, *(segments or []), T]
    ys = []
    for t0, t1 in zip(bounds[:-1], bounds[1:]):
        y, state = wkv4(w, u, k[:, t0:t1], v[:, t0:t1], state=tuple(state), backend=backend)
        ys.append(y)
    y = torch.cat(ys, dim=1)
    out = dict(zip(NAMES, (y, *state)))
    if grad:
        gy, ga, gb, gp = (x.to(device) for x in case.cotangents)
        grads = torch.autograd.grad((y, *state), leaves, (gy.to(y.dtype), ga, gb, gp))
        out.update(zip(NAMES[4:], grads))
    return {name: x.detach().float().cpu() for name, x in out.items()}


def assert_match(actual: dict, expected: dict, rtol: float, names=NAMES, rtol_for=None) -> None:
    for name in names:
        tol = (rtol_for or {}).get(name, rtol)
        e, a = expected[name], actual[name]
        scale = e.abs().max().clamp_min(1e-30).item()
        torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("T", [1, 31, 32, 33, 100, 1000])
@pytest.mark.parametrize("extreme", [False, True], ids=["normal", "extreme"])
def test_fp32_matches_reference(T, extreme):
    case = make_case(2, T, 67, extreme=extreme, seed=T)  # B*C = 134: the last block of threads is partial
    assert_match(run("cuda", case), run("reference", case), rtol=2e-4 if T < 1000 else 1e-3)


@pytest.mark.parametrize("T", [1, 33])
def test_fresh_state_matches_reference(T):
    case = make_case(3, T, 40, extreme=True, fresh=True, seed=7)
    assert_match(run("cuda", case), run("reference", case), rtol=2e-4)


@pytest.mark.parametrize("extreme", [False, True], ids=["normal", "extreme"])
def test_long_sequence_matches_cpu_kernel(extreme):
    # the reference would loop 5000 times in Python; the CPU kernel is checked against float64 in its own tests
    case = make_case(2, 5000, 67, extreme=extreme, seed=11)
    assert_match(run("cuda", case), run("cpu", case, device="cpu"), rtol=1e-3)


def test_many_lanes_match_cpu_kernel():
    # 4 * 9000 lanes: full 128-thread blocks on any GPU, the last one partial (36000 % 128 == 32)
    case = make_case(4, 33, 9000, extreme=True, seed=3)
    assert_match(run("cuda", case), run("cpu", case, device="cpu"), rtol=2e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T", [33, 300])
def test_low_precision_is_fp32_math_rounded_once(dtype, T):
    case = make_case(2, T, 67, extreme=False, seed=5)
    # round what the low-precision run stores (k, v and the cotangent of y) so that both runs see the same numbers
    w, u, k, v, *state = case.inputs
    gy, *g_state = case.cotangents
    rounded = Case((w, u, k.to(dtype).float(), v.to(dtype).float(), *state), (gy.to(dtype).float(), *g_state))
    eps = LOW_PRECISION_EPS[dtype]
    assert_match(run("cuda", rounded, dtype=dtype), run("cuda", rounded), rtol=1e-4,
                 rtol_for={"y": eps, "gk": eps, "gv": eps})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_segments_with_carried_state_equal_one_pass(dtype):
    case = make_case(2, 100, 67, extreme=True, seed=9)
    one_pass = run("cuda", case, dtype=dtype)
    # boundaries off and on the 32-step checkpoint grid
    in_segments = run("cuda", case, dtype=dtype, segments=[37, 69, 70])
    eps = LOW_PRECISION_EPS.get(dtype, 0.0)
    assert_match(in_segments, one_pass, rtol=1e-4, rtol_for={"gk": max(eps, 1e-4), "gv": max(eps, 1e-4)})


def test_inference_path_without_checkpoints():
    case = make_case(2, 70, 67, extreme=True, seed=4)
    with torch.no_grad():
        plain = run("cuda", case, grad=False)
    assert_match(plain, run("cuda", case), rtol=0.0, names=("y", "a", "b", "p"))


def test_runs_on_the_current_stream():
    case = make_case(2, 70, 67, extreme=False, seed=6)
    expected = run("cuda", case)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        on_side = run("cuda", case)
    side.synchronize()
    assert_match(on_side, expected, rtol=0.0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_a_second_device():
    case = make_case(2, 70, 67, extreme=False, seed=8)
    assert_match(run("cuda", case, device="cuda:1"), run("cuda", case, device="cuda:0"), rtol=1e-6)
