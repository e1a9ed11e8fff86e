"""Context parallelism: one window split into C contiguous pieces on C ranks, the WKV state combined exactly.

Rank c of a context group holds tokens [c T/C, (c+1) T/C) of every window. What crosses pieces in RWKV-4 is small:
- token shift: each mixer's input at the previous position: the previous rank's last row (all-gathered, [B, D]);
- WKV: the state entering a piece. The recurrence is linear in (A, B) = (a e^p, b e^p) with the per-channel decay
  e^w per token, so a piece of n tokens maps an incoming state S to e^(w n) S + L, where L is the piece's own effect
  from a zero state. Each rank runs WKV on its piece from a zero state, the ranks all-gather these summaries L (three
  [B, D] tensors per layer), rank c folds those of ranks 0..c-1 into its exact incoming state, and runs WKV again
  from it (rank 0 needs no second pass).
Every exchange is differentiable (an all-gather whose backward all-reduces and keeps this rank's slice), so the
backward passes the gradients of those states back to the earlier ranks: loss and gradients equal one process's.
Parameters are replicated over the context group like data parallelism: ZeRO-3 shards them over all C x D ranks and
averages gradients over them; each rank's loss is its piece's mean, and the pieces are equally long, so the average is
the window's mean. Modules keep the model's names (the mixers are swapped through Block's class attributes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..model import RWKV, RWKVConfig
from ..model.rwkv import Block, ChannelMix, TimeMix
from ..ops import WKVState, wkv4
from ..ops.mixing import sigmoid_gate

_GROUP = None  # this rank's context group (set by `ContextParallelRWKV` before any forward)


class _AllGather(torch.autograd.Function):
    """[C, ...] stack of every context rank's tensor; the backward sums the gradients of all ranks for this one."""

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(_GROUP))]
        dist.all_gather(parts, tensor.contiguous(), group=_GROUP)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=_GROUP)
        return grad[dist.get_rank(_GROUP)]


def _previous_last(x: torch.Tensor) -> torch.Tensor:
    """The previous rank's last row of x [B, T, D]; zeros on the first rank (token shift's value before a window),
    computed from the gathered rows so that every rank's backward runs the same collectives in the same order."""
    rows = _AllGather.apply(x[:, -1])
    rank = dist.get_rank(_GROUP)
    return rows[rank - 1] if rank > 0 else rows[0] * 0


def combine(first: WKVState, second: WKVState, w: torch.Tensor, n: int) -> WKVState:
    """The state after `first` was carried through a piece of n tokens whose own effect (from a zero state) is
    `second`: e^(w n) (a1, b1) e^p1 + (a2, b2) e^p2, kept in the kernels' (a, b, p) form with p the larger exponent."""
    p1 = first.p + w * n
    p = torch.maximum(p1, second.p)
    e1, e2 = torch.exp(p1 - p), torch.exp(second.p - p)
    return WKVState(first.a * e1 + second.a * e2, first.b * e1 + second.b * e2, p)


class ContextParallelTimeMix(TimeMix):
    def forward(self, x: torch.Tensor, shift: torch.Tensor | None, wkv_state: WKVState | None):
        # the same TimeMix, with the token-shift input and the WKV state coming from the earlier ranks
        k, v, r = self.key_value_receptance(x, _previous_last(x))
        w, u = self.decay(), self.time_first.float()
        y, local = wkv4(w, u, k, v)  # this piece from a zero state
        summaries = [_AllGather.apply(t) for t in local]  # 3 x [C, B, D]
        rank = dist.get_rank(_GROUP)
        if rank > 0:
            incoming = WKVState(*(s[0] for s in summaries))
            for j in range(1, rank):
                incoming = combine(incoming, WKVState(*(s[j] for s in summaries)), w, x.shape[1])
            y, local = wkv4(w, u, k, v, incoming)
        else:  # the zero state was right; the summaries enter with weight 0, so this rank's backward runs their
            y = y + 0 * sum(s.sum() for s in summaries)  # collectives as the others' does (no rank waits)
        return self.output(sigmoid_gate(r, y)), x[:, -1].float(), local


class ContextParallelChannelMix(ChannelMix):
    def forward(self, x: torch.Tensor, shift: torch.Tensor | None):
        return super().forward(x, _previous_last(x))


class ContextParallelBlock(Block):
    time_mix, channel_mix = ContextParallelTimeMix, ContextParallelChannelMix


class ContextParallelRWKV(RWKV):
    """The model over this rank's piece of each window: tokens [B, T/C] -> logits [B, T/C, V]. `group`: the ranks
    sharing the windows (one context group per process, kept module-wide for the mixers)."""

    block = ContextParallelBlock

    def __init__(self, cfg: RWKVConfig, group, init: bool = True):
        global _GROUP
        _GROUP = group
        super().__init__(cfg, init=init)


def context_groups(context: int, world_size: int, rank: int):
    """Context groups of `context` consecutive ranks (every rank creates every group, in the same order); returns
    (this rank's group, its rank in it, its replica index)."""
    mine = None
    for start in range(0, world_size, context):
        group = dist.new_group(list(range(start, start + context)))
        if start <= rank < start + context:
            mine = group
    return mine, rank % context, rank // context


@torch.no_grad()
def gather_pieces(logits: torch.Tensor) -> torch.Tensor:
    """The whole window's logits [B, T, V] from every rank's piece (evaluation only)."""
    return torch.cat(list(_AllGather.apply(logits)), dim=1)
