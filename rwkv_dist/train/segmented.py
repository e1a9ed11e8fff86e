"""Segmented training: the exact gradient of a long window with the activation memory of one segment.

A window of ctx_len tokens runs as ctx_len / segment_len segments, each continuing from the model state the previous
one left (token-shift inputs and the WKV state of every layer: RWKVState), so the forward is the unsegmented one.
Each segment runs under activation checkpointing (torch.utils.checkpoint, non-reentrant): the forward keeps only the
segment's inputs (its tokens and the state coming in) and its loss, the backward recomputes one segment at a time, in
reverse, and passes the gradient of the incoming state on to the segment before. That is full backpropagation through
time: the gradient is the unsegmented one, while saved activations scale with segment_len, not ctx_len (plus one
state per boundary: 5 x L x B x D floats). The loss is computed inside each segment, so a window's full logits never
exist either.

`SegmentedRWKV` is the model with one more way to be called, `model(tokens, targets)` -> (mean loss, what to
differentiate); its parameters and names are the model's, so checkpoints, exports and DeepSpeed see no difference.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..model import RWKV, RWKVConfig
from ..model.rwkv import RWKVState
from .loss import lm_loss


class SegmentedRWKV(RWKV):
    def __init__(self, cfg: RWKVConfig, segment_len: int, use_l2wrap: bool = True, init: bool = True):
        super().__init__(cfg, init=init)
        self.segment_len, self.use_l2wrap = segment_len, use_l2wrap

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, state: RWKVState | None = None,
                return_state: bool = False):
        """With targets: (mean next-token loss over the window, the same tensor as the objective: its backward carries
        L2Wrap's gradient), segment by segment. Without: the model's own forward (evaluation, generation)."""
        if targets is None:
            return super().forward(tokens, state, return_state)
        positions = targets.numel()
        loss = None
        for start in range(0, tokens.shape[1], self.segment_len):
            piece = slice(start, start + self.segment_len)
            inputs = () if state is None else tuple(state)
            part_loss, *carried = checkpoint(self._segment, tokens[:, piece], targets[:, piece], positions, *inputs,
                                             use_reentrant=False)
            state = RWKVState(*carried)
            loss = part_loss if loss is None else loss + part_loss
        return loss, loss

    def _segment(self, tokens, targets, positions: int, *state):
        """One segment from `state` (none: a fresh window): its share of the window's mean loss (with L2Wrap in its
        backward) and the state it leaves."""
        logits, new_state = super().forward(tokens, RWKVState(*state) if state else None, return_state=True)
        # L2Wrap's extra gradient per position is 1e-4 / (the window's positions), as in one unsegmented forward
        part = lm_loss(logits, targets, self.use_l2wrap, divisor=positions, positions=positions)
        return (part, *new_state)
