"""Plain PyTorch WKV: the stable recurrence one time step at a time, differentiated by autograd.

Slow (a Python loop over T) but short enough to read against the paper; the kernels are tested against it and against
the float64 closed form in tests/. Math runs in float32, or float64 when k/v are float64.
"""

from __future__ import annotations

import torch

from .state import WKVState


def wkv4_reference(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: WKVState
) -> tuple[torch.Tensor, WKVState]:
    out_dtype = v.dtype
    math = torch.float64 if k.dtype == torch.float64 else torch.float32
    w, u = w.to(math), u.to(math)
    k, v = k.to(math), v.to(math)
    a, b, p = (x.to(math) for x in state)
    ys = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        # output: (A + e^{u+k} v) / (B + e^{u+k}) with A = a e^p, B = b e^p, everything scaled by e^{-m}
        m = torch.maximum(p, u + kt)
        e1, e2 = torch.exp(p - m), torch.exp(u + kt - m)
        ys.append((e1 * a + e2 * vt) / (e1 * b + e2))
        # advance: A <- e^w A + e^k v, B <- e^w B + e^k; ties go to the decay branch, as in the kernels
        wp = w + p
        p_new = torch.where(wp >= kt, wp, kt)
        f1, f2 = torch.exp(wp - p_new), torch.exp(kt - p_new)
        a, b, p = f1 * a + f2 * vt, f1 * b + f2, p_new
    y = torch.stack(ys, dim=1).to(out_dtype)
    return y, WKVState(a, b, p)
