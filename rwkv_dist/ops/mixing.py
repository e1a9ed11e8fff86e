"""The elementwise parts of an RWKV-4 block, fused: token shift with its mixes, squared ReLU, sigmoid gate.

    shift_mix(x, last, mus)  -> [x_prev + mu_i (x - x_prev) for mu_i in mus],  x_prev[t] = x[t-1], last (or 0) at t = 0
    squared_relu(x)          -> max(x, 0)^2
    sigmoid_gate(r, y)       -> sigmoid(r) * y

As compositions of torch ops each of these makes several passes over the activations forward and more backward (a
lerp's backward alone reads and writes its [B, T, D] operands four times, and a time-mix has three lerps); on a CPU
that memory traffic, not the matmuls, was what kept RWKV's FLOP/s below a GPT's (bench/train_throughput.py). The CPU
kernels in csrc/mix_cpu.cpp make one pass forward and one backward, with fp32 math for every storage dtype; gradients:

    d/dx[t]  = sum_i g_i[t] mu_i + g_i[t+1] (1 - mu_i)      d/dlast = sum_i g_i[0] (1 - mu_i)
    d/dmu_i  = sum_{b,t} g_i[t] (x[t] - x_prev[t])
    squared ReLU: 2 max(x, 0) g;      sigmoid gate: d/dy = g s,  d/dr = g y s (1 - s),  s = sigmoid(r)

Other devices, float64, and CPUs where the kernels cannot be built (warned once) run `reference_*`, the same math in
torch ops (also what the tests compare against, in float64). RWKV_DIST_MIX_BACKEND=reference forces it on CPU too.
"""

from __future__ import annotations

import torch

from ._build import cpu_extension, cpu_kernel_takes


def reference_shift_mix(x: torch.Tensor, last: torch.Tensor | None, mus: list[torch.Tensor]) -> list[torch.Tensor]:
    first = torch.zeros_like(x[:, :1]) if last is None else last[:, None].to(x.dtype)
    previous = torch.cat((first, x[:, :-1]), dim=1)
    return [torch.lerp(previous, x, mu.to(x.dtype)) for mu in mus]


def reference_squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.square(torch.relu(x))


def reference_sigmoid_gate(r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(r) * y


def _use_kernel(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return all(t.dtype == first.dtype and t.shape == first.shape for t in tensors[1:]) and cpu_kernel_takes(
        first, "RWKV_DIST_MIX_BACKEND"
    )


def shift_mix(x: torch.Tensor, last: torch.Tensor | None, mus: list[torch.Tensor]) -> list[torch.Tensor]:
    """x [B, T, D]; last [B, D] (the previous segment's final x, float32) or None; each mu broadcastable to [D].
    Returns one [B, T, D] tensor in x's dtype per mu."""
    if not _use_kernel(x):
        return reference_shift_mix(x, last, mus)
    mu = torch.stack([m.reshape(-1) for m in mus]).float()  # autograd carries d/dmu back to each parameter
    if last is not None:
        last = last.float()
    return list(_ShiftMix.apply(x.contiguous(), last, mu))


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return _SquaredReLU.apply(x.contiguous()) if _use_kernel(x) else reference_squared_relu(x)


def sigmoid_gate(r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _SigmoidGate.apply(r.contiguous(), y.contiguous()) if _use_kernel(r, y) else reference_sigmoid_gate(r, y)


def _contiguous(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g.to(like.dtype).contiguous()


class _ShiftMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, last, mu):
        ctx.save_for_backward(x, last, mu)
        return tuple(cpu_extension().mix_forward(x, last, mu))

    @staticmethod
    def backward(ctx, *grads):
        x, last, mu = ctx.saved_tensors
        gx, g_last, g_mu = cpu_extension().mix_backward(x, last, mu, [_contiguous(g, x) for g in grads])
        return gx, (g_last if last is not None else None), g_mu


class _SquaredReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return cpu_extension().squared_relu_forward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return cpu_extension().squared_relu_backward(x, _contiguous(g, x))


class _SigmoidGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, y):
        ctx.save_for_backward(r, y)
        return cpu_extension().sigmoid_gate_forward(r, y)

    @staticmethod
    def backward(ctx, g):
        r, y = ctx.saved_tensors
        gr, gy = cpu_extension().sigmoid_gate_backward(r, y, _contiguous(g, r))
        return gr, gy
