"""The language-modelling loss: mean (or summed) next-token cross-entropy in fp32, whatever the logits' dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """logits [..., V], targets [...] -> cross-entropy over every position ("mean" or "sum")."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.to(logits.device).flatten(), reduction=reduction)
