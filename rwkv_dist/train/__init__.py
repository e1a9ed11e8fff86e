"""Training: optimizer recipe and LR schedule (the DeepSpeed trainer, checkpoints and logging build on these)."""

from .optim import lr_at, param_groups

__all__ = ["lr_at", "param_groups"]
