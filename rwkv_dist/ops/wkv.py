"""The WKV operator of RWKV-4 with its backends: fused CUDA, OpenMP CPU, plain reference.

    y_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (sum_{i<t} e^{(t-1-i) w + k_i} + e^{u + k_t})

per batch row and channel, with w = -exp(time_decay) and u = time_first. The state (a, b, p) carries the two sums of a
prefix scaled by e^{-p}; passing the state returned by one segment into the next equals one pass over both.

Kernel gradients (csrc/wkv4_core.h). With D_t = B_{t-1} + e^{u+k_t} and gA_t = dL/dA_t, gB_t = dL/dB_t:
    dL/dv_t = gy_t e^{u+k_t} / D_t + gA_t e^{k_t}
    dL/dk_t = gy_t e^{u+k_t} (v_t - y_t) / D_t + e^{k_t} (gA_t v_t + gB_t)
    dL/du   = sum_t gy_t e^{u+k_t} (v_t - y_t) / D_t
    dL/dw   = sum_t e^w (gA_t A_{t-1} + gB_t B_{t-1})
    gA_{t-1} = e^w gA_t + gy_t / D_t,   gB_{t-1} = e^w gB_t - gy_t y_t / D_t
run in reverse over T. gA, gB are kept scaled by a running exponent like the forward state; the states A_{t-1}, B_{t-1}
are recomputed chunk by chunk from checkpoints the forward saved every 32 steps, so memory is O(BTC/32) and T is unbounded.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from .. import errors
from ._build import KERNEL_DTYPES, cpu_extension, cpu_kernels_available, cuda_extension
from .reference import wkv4_reference
from .state import WKVState

Backend = Literal["auto", "cuda", "cpu", "reference"]


def wkv4(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WKVState | tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, WKVState]:
    """WKV over k, v [B, T, C] given w, u [C]; returns y (v's dtype) and the new state (float32 a, b, p each [B, C]).

    Math is float32 whatever the input dtype (float64 inputs run the float64 reference). Differentiable in w, u, k, v
    and the incoming state. `backend="auto"` picks CUDA for CUDA tensors, else the CPU kernel (RWKV_DIST_WKV_BACKEND
    overrides the automatic choice, e.g. `reference` to debug). Where the CPU kernel cannot be built, `auto` runs the
    reference after one warning and `cpu` raises errors.KernelBuildError.
    """
    _check_inputs(w, u, k, v)
    batch, _, channels = k.shape
    if state is None:
        math = torch.float64 if k.dtype == torch.float64 else torch.float32
        state = WKVState.fresh(batch, channels, k.device, math)
    else:
        if not isinstance(state, (tuple, list)) or len(state) != 3:
            raise errors.ShapeError("wkv4: state must be a WKVState (a, b, p) or None")
        state = WKVState(*state)
        state.check(batch, channels, k.device)
    chosen = _choose_backend(backend, k)
    if chosen == "reference":
        return wkv4_reference(w, u, k, v, state)
    if state.a.dtype != torch.float32:
        raise errors.ShapeError(f"wkv4: the {chosen} kernel takes a float32 state, got {state.a.dtype}")
    w32, u32 = w.float().contiguous(), u.float().contiguous()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (w, u, k, v, *state))
    y, a, b, p = _WKV4Kernel.apply(chosen, needs_grad, w32, u32, k.contiguous(), v.contiguous(), *state)
    return y, WKVState(a, b, p)


def _extension(backend: str):
    return cuda_extension() if backend == "cuda" else cpu_extension()


class _WKV4Kernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, needs_grad, w, u, k, v, a0, b0, p0):
        ext = _extension(backend)
        s0 = torch.stack((a0, b0, p0)).contiguous()
        # The CUDA binding cannot see torch's current stream (it builds against CPU torch too): pass it, and select k's
        # device for the launch. torch.cuda.device(-1) is a no-op, so the CPU path never touches CUDA.
        on_gpu = backend == "cuda"
        stream = (torch.cuda.current_stream(k.device).cuda_stream,) if on_gpu else ()
        with torch.cuda.device(k.device if on_gpu else -1):
            y, state, checkpoints = ext.forward(w, u, k, v, s0, needs_grad, *stream)
        ctx.backend = backend
        if needs_grad:
            ctx.save_for_backward(w, u, k, v, checkpoints, state)
        return y, state[0], state[1], state[2]

    @staticmethod
    def backward(ctx, gy, g_a, g_b, g_p):
        w, u, k, v, checkpoints, state = ctx.saved_tensors
        gy = torch.zeros_like(k) if gy is None else gy.to(k.dtype).contiguous()
        g_state = torch.stack([torch.zeros_like(state[0]) if g is None else g.float() for g in (g_a, g_b, g_p)])
        on_gpu = ctx.backend == "cuda"
        stream = (torch.cuda.current_stream(k.device).cuda_stream,) if on_gpu else ()
        with torch.cuda.device(k.device if on_gpu else -1):
            gw, gu, gk, gv, g_s0 = _extension(ctx.backend).backward(
                w, u, k, v, gy, checkpoints, state, g_state.contiguous(), *stream
            )
        return None, None, gw.sum(0), gu.sum(0), gk, gv, g_s0[0], g_s0[1], g_s0[2]


def _choose_backend(backend: str, k: torch.Tensor) -> str:
    if backend not in ("auto", "cuda", "cpu", "reference"):
        raise errors.ShapeError(f"wkv4: unknown backend {backend!r} (auto, cuda, cpu, reference)")
    if backend == "auto":
        backend = os.environ.get("RWKV_DIST_WKV_BACKEND", "auto")
    if k.dtype == torch.float64:
        if backend not in ("auto", "reference"):
            raise errors.ShapeError(f"wkv4: float64 inputs run only on the reference backend, not {backend!r}")
        return "reference"
    if backend == "auto":  # on CPU the kernel when it builds here, else (warned once) the reference
        return "cuda" if k.is_cuda else "cpu" if cpu_kernels_available() else "reference"
    if backend == "cuda" and not k.is_cuda:
        raise errors.ShapeError(f"wkv4: backend 'cuda' needs CUDA tensors, k is on {k.device}")
    if backend == "cpu" and k.device.type != "cpu":
        raise errors.ShapeError(f"wkv4: backend 'cpu' needs CPU tensors, k is on {k.device}")
    return backend


def _check_inputs(w, u, k, v) -> None:
    for name, x in (("w", w), ("u", u), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise errors.ShapeError(f"wkv4: {name} must be a tensor, got {type(x).__name__}")
    if k.dim() != 3:
        raise errors.ShapeError(f"wkv4: k must be [B, T, C], got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise errors.ShapeError(f"wkv4: v has shape {tuple(v.shape)}, k has {tuple(k.shape)}")
    if k.dtype not in (*KERNEL_DTYPES, torch.float64):
        raise errors.ShapeError(f"wkv4: k has dtype {k.dtype}; use float32, bfloat16, float16 or float64")
    if v.dtype != k.dtype:
        raise errors.ShapeError(f"wkv4: v has dtype {v.dtype}, k has {k.dtype}")
    batch, steps, channels = k.shape
    if min(batch, steps, channels) < 1:
        raise errors.ShapeError(f"wkv4: k has an empty dimension, shape {tuple(k.shape)}")
    for name, x in (("w", w), ("u", u)):
        if tuple(x.shape) != (channels,):
            raise errors.ShapeError(f"wkv4: {name} must have shape ({channels},), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise errors.ShapeError(f"wkv4: {name} must be floating point, got {x.dtype}")
    for name, x in (("v", v), ("w", w), ("u", u)):
        if x.device != k.device:
            raise errors.ShapeError(f"wkv4: {name} is on {x.device}, k is on {k.device}")
