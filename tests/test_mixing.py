"""The fused elementwise ops of a block (rwkv_dist/ops/mixing.py, csrc/mix_cpu.cpp) against float64 compositions of
torch ops: forward and every gradient, in each storage dtype, with and without an incoming token-shift state."""

import pytest
import torch

from rwkv_dist.ops import mixing

# fp32 kernels agree with float64 to rounding; bf16/fp16 outputs are rounded once from fp32 math.
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _leaf(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.detach().to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_last", [False, True])
@pytest.mark.parametrize("shape", [(3, 7, 37), (2, 1, 16), (2, 300, 64)])  # ragged D; T = 1; big enough for threads
@pytest.mark.parametrize("mixes", [3, 2, 1])  # TimeMix's, ChannelMix's, and the kernel's general path
def test_shift_mix_matches_float64(dtype, with_last, shape, mixes):
    g = torch.Generator().manual_seed(0)
    B, T, D = shape
    x = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    last = torch.randn(B, D, dtype=torch.float64, generator=g, requires_grad=True) if with_last else None
    mus = [torch.rand(1, 1, D, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(mixes)]
    grads = [torch.randn(shape, dtype=torch.float64, generator=g) for _ in range(mixes)]
    assert mixing._use_kernel(x.to(dtype))
    leaves = [x, *([last] if with_last else []), *mus]
    ours_leaves = [_leaf(x, dtype), *([_leaf(last, torch.float32)] if with_last else []),
                   *[_leaf(m, torch.float32) for m in mus]]
    ours = mixing.shift_mix(ours_leaves[0], ours_leaves[1] if with_last else None, ours_leaves[-mixes:])
    # the reference sees exactly the rounded inputs the kernel saw
    ref_leaves = [leaf.detach().double().requires_grad_() for leaf in ours_leaves]
    ref = mixing.reference_shift_mix(ref_leaves[0], ref_leaves[1] if with_last else None, ref_leaves[-mixes:])
    for a, b in zip(ours, ref):
        assert a.dtype == dtype and a.shape == shape
        assert _rel(a, b) < TOLERANCE[dtype]
    ours_grads = torch.autograd.grad(ours, ours_leaves, [gr.to(dtype) for gr in grads])
    ref_grads = torch.autograd.grad(ref, ref_leaves, [gr.to(dtype).double() for gr in grads])
    assert len(ours_grads) == len(leaves)
    for a, b in zip(ours_grads, ref_grads):
        assert _rel(a, b) < TOLERANCE[dtype] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squared_relu_and_sigmoid_gate_match_float64(dtype):
    g = torch.Generator().manual_seed(1)
    x, r, y, grad = (torch.randn(4, 129, 33, generator=g, dtype=torch.float64).to(dtype).double() for _ in range(4))
    for op, ref_op, inputs in (
        (mixing.squared_relu, mixing.reference_squared_relu, [x]),
        (mixing.sigmoid_gate, mixing.reference_sigmoid_gate, [r * 8, y]),  # r * 8: both tails of the sigmoid
    ):
        ours_in = [_leaf(t, dtype) for t in inputs]
        ref_in = [t.detach().requires_grad_() for t in inputs]
        ours, ref = op(*ours_in), ref_op(*ref_in)
        assert ours.dtype == dtype and _rel(ours, ref) < TOLERANCE[dtype]
        for a, b in zip(torch.autograd.grad(ours, ours_in, grad.to(dtype)), torch.autograd.grad(ref, ref_in, grad)):
            assert _rel(a, b) < TOLERANCE[dtype] * 2


def test_nan_propagates_and_reference_backend_is_selectable(monkeypatch):
    x = torch.tensor([[[float("nan"), -1.0, 2.0]]])
    assert torch.isnan(mixing.squared_relu(x)[0, 0, 0]) and mixing.squared_relu(x)[0, 0, 1] == 0
    assert torch.isnan(mixing.sigmoid_gate(x, torch.ones_like(x))[0, 0, 0])
    monkeypatch.setenv("RWKV_DIST_MIX_BACKEND", "reference")
    assert not mixing._use_kernel(x)
    assert not mixing._use_kernel(x.double())
