"""The language-modelling loss: next-token cross-entropy in fp32 whatever the logits' dtype, and L2Wrap.

L2Wrap (official RWKV-4 code) nudges each position's largest logit toward 0 without changing the reported loss: the
backward adds factor * max_logit to the gradient of each position's argmax logit, with factor = 1e-4 / (B T), the
gradient of the penalty (factor / 2) * sum over positions of max_logit^2, which keeps logits from drifting up in
bf16. Unlike the official code the extra gradient is scaled by the incoming gradient, so gradient accumulation (which
scales the loss) scales it too.

On CPU, for fp32/bf16/fp16 logits, both run on the fused kernel of csrc/loss_cpu.cpp (one read of the logits
forward, one read and one write backward, fp32 math); elsewhere (CUDA, float64, no compiler) on the torch ops below,
which the tests also use as the reference. RWKV_DIST_LOSS_BACKEND=reference forces them on CPU too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops._build import cpu_extension, cpu_kernel_takes

L2WRAP_SCALE = 1e-4


def _use_kernel(logits: torch.Tensor) -> bool:
    return logits.shape[-1] > 0 and cpu_kernel_takes(logits, "RWKV_DIST_LOSS_BACKEND")


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """logits [..., V], targets [...] -> cross-entropy over every position ("mean" or "sum")."""
    if _use_kernel(logits) and not (torch.is_grad_enabled() and logits.requires_grad) and reduction in ("mean", "sum"):
        rows = cpu_extension().cross_entropy_forward(*_rows(logits, targets))[0]
        return rows.sum() / (rows.numel() if reduction == "mean" else 1)
    return F.cross_entropy(logits.float().flatten(0, -2), targets.to(logits.device).flatten(), reduction=reduction)


class _CrossEntropyL2Wrap(torch.autograd.Function):
    """sum of the positions' cross-entropy / divisor, whose backward also carries L2Wrap's extra gradient. One op
    instead of cross_entropy + a separate L2Wrap node: the backward makes the softmax gradient in one buffer and adds
    both sparse terms to it in place (no zero-filled [N, V] tensors, no second full-size gradient to add)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, divisor: int, l2wrap_factor: float) -> torch.Tensor:
        ctx.divisor, ctx.factor, ctx.dtype, ctx.shape = divisor, l2wrap_factor, logits.dtype, logits.shape
        ctx.kernel = _use_kernel(logits)
        if ctx.kernel:
            x, t = _rows(logits.detach(), targets)
            rows, lse, top, index = cpu_extension().cross_entropy_forward(x, t)
            ctx.save_for_backward(x, t, lse, top, index)
            return rows.sum() / divisor
        x = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, -2)
        t = targets.to(x.device).flatten()[:, None]
        logprobs = torch.log_softmax(x, dim=-1)
        top, index = x.max(dim=-1, keepdim=True)  # each position's largest logit and its (first) index
        ctx.save_for_backward(logprobs, t, top, index)
        return -logprobs.gather(1, t).sum() / divisor

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.kernel:
            x, t, lse, top, index = ctx.saved_tensors
            g = grad_loss.item()
            grad = cpu_extension().cross_entropy_backward(x, t, lse, top, index, g / ctx.divisor, g * ctx.factor)
            return grad.view(ctx.shape), None, None, None
        logprobs, t, top, index = ctx.saved_tensors
        grad = logprobs.exp()  # softmax
        grad.scatter_add_(1, t, torch.full_like(top, -1.0))  # - one-hot(target)
        grad.mul_(grad_loss / ctx.divisor)
        if ctx.factor:
            grad.scatter_add_(1, index, top * (grad_loss * ctx.factor))
        return grad.to(ctx.dtype).view(ctx.shape), None, None, None


def _rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's operands: logits as contiguous [N, V] rows, targets as contiguous int64 [N]."""
    x = logits.reshape(-1, logits.shape[-1]).contiguous()
    return x, targets.to(x.device).reshape(-1).long().contiguous()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, l2wrap: bool = True, divisor: int | None = None,
            positions: int | None = None) -> torch.Tensor:
    """The training loss: cross-entropy over logits [..., V] and targets [...], summed and divided by `divisor`
    (default: the number of positions, the mean), with L2Wrap's extra gradient in its backward when `l2wrap`.
    positions: the B x T of the whole window when `logits` are a segment of it (default: the logits' own)."""
    count = targets.numel()
    factor = L2WRAP_SCALE / (positions or count) if l2wrap else 0.0
    return _CrossEntropyL2Wrap.apply(logits, targets, divisor or count, factor)
