"""Training: optimizer recipe and LR schedule (the DeepSpeed trainer, checkpoints and logging build on these)."""

from .loss import lm_loss
from .optim import lr_at, param_groups

__all__ = ["lm_loss", "lr_at", "param_groups"]
