"""Pieces every strategy shares: the guarded optimizer, the DeepSpeed config, activation checkpointing, the loss."""

from __future__ import annotations

from typing import Iterable

import torch

from ..config import RunConfig
from ..model.init import init_weights
from ..train.loss import lm_loss


class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW (bit-exact resume, unlike DeepSpeed's fused/CPU Adam) that refuses to apply non-finite gradients
    and records whether it stepped. Under ZeRO-3 and bf16 DeepSpeed has already skipped such a step globally; under
    fp32 ZeRO-0 the gradients are all-reduced before this runs, so every rank takes the same decision."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stepped = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):  # one device sync
            return None
        self.stepped = True
        return super().step(closure)


def deepspeed_config(cfg: RunConfig, device: torch.device, zero_stage: int, grad_accum: int, data_parallel: int,
                     load_universal: bool = False) -> dict:
    """One engine's config. cfg.precision is already resolved (bf16 | fp32). load_universal: the engine will load a
    universal checkpoint (a resume on another world size)."""
    s, p = cfg.schedule, cfg.parallel
    zero: dict = {"stage": zero_stage}
    pin = device.type == "cuda"
    if zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=p.persistence_threshold, contiguous_gradients=True,
                    overlap_comm=device.type == "cuda")
        if p.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
        if p.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_batch_size": s.micro_batch_size * grad_accum * data_parallel,
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # torch AdamW on offloaded partitions: exact resume
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


def with_activation_checkpointing(blocks: Iterable[torch.nn.Module]) -> None:
    """Recompute each block's activations in the backward instead of storing them (one extra forward, ~1/3 more
    FLOPs, activation memory per block down to its input)."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        inner = block.forward

        def forward(x, state=None, _inner=inner):
            if state is None and torch.is_grad_enabled():
                return checkpoint(_inner, x, None, use_reentrant=False)
            return _inner(x, state)

        block.forward = forward


def training_loss(cfg: RunConfig, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the reported loss, what to differentiate): one tensor, whose backward carries L2Wrap's extra gradient when
    enabled (the pair keeps the signature of the strategies that compute them apart, e.g. tensor parallelism)."""
    loss = lm_loss(logits, targets, cfg.l2wrap)
    return loss, loss


def initialize(model: torch.nn.Module, seed: int, edit=None, weights: dict[str, torch.Tensor] | None = None) -> None:
    """The official initialization from a fresh seed, so the random numbers do not depend on what the construction
    drew (a pipeline stage constructs only some modules): every strategy starts from the same weights. With `weights`
    (a whole fp32 state dict, checkpoint.init_from) every parameter takes its value instead, through the same `edit`
    protocol (rwkv_dist.model.init.init_weights), so sharded and split parameters are written the same way."""
    torch.manual_seed(seed)
    if weights is None:
        init_weights(model) if edit is None else init_weights(model, edit=edit)
        return
    with torch.no_grad():
        for name, param in model.named_parameters():
            if edit is None:
                param.copy_(weights[name])
                continue
            with edit(param) as target:
                if target is not None:
                    target.copy_(weights[name])
