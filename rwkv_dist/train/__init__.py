"""Training: optimizer recipe and LR schedule (the DeepSpeed trainer, checkpoints and logging build on these)."""

from .l2wrap import l2wrap
from .optim import lr_at, param_groups

__all__ = ["l2wrap", "lr_at", "param_groups"]
