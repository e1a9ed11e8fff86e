"""L2Wrap (official RWKV-4 code): nudge each position's largest logit toward 0 without changing the reported loss.

The backward adds factor * max_logit to the gradient of each position's argmax logit, with factor = 1e-4 / (B T):
the gradient of the penalty (factor / 2) * sum over positions of max_logit^2, which keeps logits from drifting up in
bf16. Unlike the official code the extra gradient is scaled by the incoming gradient, so gradient accumulation (which
scales the loss) scales it too.
"""

from __future__ import annotations

import torch

L2WRAP_SCALE = 1e-4


class _L2Wrap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss: torch.Tensor, logits: torch.Tensor, positions: int) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.positions = positions
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (logits,) = ctx.saved_tensors
        top, index = logits.max(dim=-1, keepdim=True)
        g_logits = torch.zeros_like(logits).scatter_(-1, index, top * (L2WRAP_SCALE / ctx.positions))
        return grad_loss, g_logits * grad_loss, None


def l2wrap(loss: torch.Tensor, logits: torch.Tensor, positions: int | None = None) -> torch.Tensor:
    """`loss` unchanged in value; its backward also pushes each position's max logit of `logits` [..., V] toward 0.
    positions: the B x T of the whole window when `logits` are a segment of it (default: the logits' own)."""
    return _L2Wrap.apply(loss, logits, positions or logits.numel() // logits.shape[-1])
