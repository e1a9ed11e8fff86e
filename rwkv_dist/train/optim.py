"""The paper's optimizer recipe as the official RWKV-4 code runs it, and a warmup-stable-decay alternative.

Parameter groups: time_decay at 2x the LR and time_first at 3x (official multipliers, configurable); weight decay, when
asked for, only on matrices — never on 1-D parameters (layer norms, time_*), nor on the embedding.
LR schedules (`optimizer.schedule`), both with the official code's warmup (the LR ramps from 0.2x to 1x of lr_init
over warmup_steps):
  exponential (default)  from lr_init to lr_final exponentially over the steps after warmup,
                         lr(s) = lr_init (lr_final / lr_init)^progress(s) x warmup(s).
  wsd                    warmup-stable-decay (Hägele et al. 2024, MiniCPM 2024): lr_init until the decay starts
                         (`decay_start`: the last decay_fraction of the steps decay), then down to lr_final at the
                         last step, linearly or as 1 - sqrt(progress) (Hägele et al.'s better-performing shape).
Before its decay a wsd run's LR does not depend on its length, so a run of any length is a constant-LR run up to its
decay start plus a short cooldown: sweeps train the constant phase once and branch the cooldowns off its checkpoints.
"""

from __future__ import annotations

import math

from torch import nn

from ..config import TrainOptimizerConfig


def param_groups(model: nn.Module, opt: TrainOptimizerConfig) -> list[dict]:
    """Groups for torch.optim.AdamW; each carries `lr_mult`, which the schedule multiplies into its LR."""
    buckets: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("time_decay"):
            mult = opt.time_decay_lr_mult
        elif name.endswith("time_first"):
            mult = opt.time_first_lr_mult
        else:
            mult = 1.0
        dims = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 shard is flat; ds_shape is the parameter's shape
        decays = opt.weight_decay > 0 and dims == 2 and not name.startswith("emb.")
        buckets.setdefault((mult, opt.weight_decay if decays else 0.0), []).append(p)
    return [{"params": ps, "lr_mult": mult, "weight_decay": wd, "lr": opt.lr_init * mult}
            for (mult, wd), ps in sorted(buckets.items())]


def lr_at(step: int, opt: TrainOptimizerConfig, total_steps: int) -> float:
    """Base LR for optimizer step `step` (0-based) of `total_steps`."""
    if opt.schedule == "wsd":
        return _wsd(step, opt, total_steps)
    decay_steps = max(total_steps - opt.warmup_steps, 1)
    progress = min(max((step - opt.warmup_steps) / decay_steps, 0.0), 1.0)
    lr = opt.lr_init * math.exp(math.log(opt.lr_final / opt.lr_init) * progress)
    if step < opt.warmup_steps:
        lr *= 0.2 + 0.8 * step / opt.warmup_steps
    return lr


def _wsd(step: int, opt: TrainOptimizerConfig, total_steps: int) -> float:
    # Warmup and constant phase use expressions free of total_steps: a cooldown branched off a constant-LR run then
    # sees bit for bit the LRs an independent run of its length would have seen.
    if step < opt.warmup_steps:
        return opt.lr_init * (0.2 + 0.8 * step / opt.warmup_steps)
    start = opt.decay_start(total_steps)
    if step < start:
        return opt.lr_init
    progress = min((step - start + 1) / (total_steps - start), 1.0)  # in (0, 1]: the last step runs at lr_final
    if opt.decay_shape == "linear":
        return opt.lr_init + (opt.lr_final - opt.lr_init) * progress
    return opt.lr_final + (opt.lr_init - opt.lr_final) * (1.0 - math.sqrt(progress))
