"""The RWKV-4 initialization of the official v4neo code (the paper's appendix is garbled on the matrices).

For layer l of L and channel i of D (ratio_0_to_1 = l/(L-1), ratio_1_to_almost0 = 1 - l/L):
  time_decay_i = -5 + 8 (i/(D-1))^(0.7 + 1.3 ratio_0_to_1)      time_first_i = log(0.3) + 0.5 ((i+1) mod 3 - 1)
  att: mu_k = (i/D)^ratio_1_to_almost0, mu_v = mu_k + 0.3 ratio_0_to_1, mu_r = (i/D)^(0.5 ratio_1_to_almost0)
  ffn: mu_k = mu_r = (i/D)^ratio_1_to_almost0
  emb ~ U(-1e-4, 1e-4) (ln0 follows it); layer norms weight 1, bias 0;
  zero: att.key, att.receptance, att.output, ffn.value, ffn.receptance;
  orthogonal with gain sqrt(rows/cols) when rows > cols (else 1) for the other matrices; the head's gain is halved.
With one layer the official code divides by zero in ratio_0_to_1; we take it as 0.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

ZERO_INIT = ("att.key", "att.receptance", "att.output", "ffn.value", "ffn.receptance")
EMBEDDING_SCALE = 1e-4
HEAD_GAIN_SCALE = 0.5


def layer_ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    """(ratio_0_to_1, ratio_1_to_almost0) of the official code."""
    ratio_0_to_1 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    return ratio_0_to_1, 1.0 - layer_id / n_layer


def time_decay_init(layer_id: int, n_layer: int, dim: int) -> torch.Tensor:
    r01, _ = layer_ratios(layer_id, n_layer)
    h = torch.arange(dim, dtype=torch.float64) / max(dim - 1, 1)
    return -5 + 8 * h ** (0.7 + 1.3 * r01)


def time_first_init(dim: int) -> torch.Tensor:
    zigzag = torch.tensor([((i + 1) % 3 - 1) * 0.5 for i in range(dim)], dtype=torch.float64)
    return math.log(0.3) + zigzag


def time_mix_init(layer_id: int, n_layer: int, dim: int) -> dict[str, torch.Tensor]:
    """The token-shift mixes of both mixers of one block, keyed by their parameter names below the block."""
    r01, r10 = layer_ratios(layer_id, n_layer)
    x = torch.arange(dim, dtype=torch.float64) / dim
    mu_k = x**r10
    return {
        "att.time_mix_k": mu_k,
        "att.time_mix_v": mu_k + 0.3 * r01,
        "att.time_mix_r": x ** (0.5 * r10),
        "ffn.time_mix_k": mu_k,
        "ffn.time_mix_r": mu_k,
    }


def orthogonal_gain(rows: int, cols: int) -> float:
    return math.sqrt(rows / cols) if rows > cols else 1.0


@contextmanager
def _in_place(param: nn.Parameter):
    yield param


@torch.no_grad()
def init_weights(model: nn.Module, edit=_in_place) -> None:
    """Apply the rules above in place to an RWKV model (rwkv_dist.model.RWKV).

    edit(param) is a context manager yielding the tensor this process writes `param`'s values into, or None: the
    default writes in place; a sharded model (ZeRO-3 construction) gathers the parameter and lets one rank write it;
    a pipeline stage writes its own parameters and draws the others into scratch space. Parameters are visited in
    one fixed order, so the writing process draws the same random numbers in every case."""
    cfg = model.cfg
    D = cfg.n_embd

    def put(param: nn.Parameter, fill) -> None:
        with edit(param) as target:
            if target is None:
                return
            if target.dtype == torch.float32:
                fill(target)
            else:  # a low-precision parameter gets the fp32 values rounded (QR has no bf16 kernel)
                full = torch.empty(target.shape, dtype=torch.float32, device=target.device)
                fill(full)
                target.copy_(full)

    put(model.emb.weight, lambda w: w.uniform_(-EMBEDDING_SCALE, EMBEDDING_SCALE))
    put(model.head.weight, lambda w: nn.init.orthogonal_(w, gain=HEAD_GAIN_SCALE * orthogonal_gain(*w.shape)))
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            put(module.weight, nn.init.ones_)
            put(module.bias, nn.init.zeros_)
    for block in model.blocks:
        l = block.layer_id
        put(block.att.time_decay, lambda t: t.copy_(time_decay_init(l, cfg.n_layer, D)))
        put(block.att.time_first, lambda t: t.copy_(time_first_init(D)))
        for name, value in time_mix_init(l, cfg.n_layer, D).items():
            put(block.get_parameter(name), lambda t: t.copy_(value.view(1, 1, D)))
        for name, linear in block.named_modules():
            if not isinstance(linear, nn.Linear):
                continue
            if name in ZERO_INIT:
                put(linear.weight, nn.init.zeros_)
            else:
                put(linear.weight, lambda w: nn.init.orthogonal_(w, gain=orthogonal_gain(*w.shape)))
