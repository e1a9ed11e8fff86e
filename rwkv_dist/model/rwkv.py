"""RWKV-4 (Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era"), one module, two modes.

    x_0   = ln0(emb(token))
    x    += TimeMix(ln1(x))        r, k, v = W_r xr, W_k xk, W_v xv;  out = W_o(sigmoid(r) * WKV(w, u, k, v))
    x    += ChannelMix(ln2(x))     sigmoid(W_r xr) * W_v(relu(W_k xk)^2)
    logits = head(ln_out(x))

where x? = x * mu + shift(x) * (1 - mu) mixes each position with the previous one (token shift). The elementwise
parts (shift + mixes, sigmoid gates, squared ReLU) run as fused ops in parallel mode (rwkv_dist/ops/mixing.py).
Parallel ("GPT") mode runs the WKV operator over [B, T]; recurrent ("RNN") mode, `step`, advances one token with a
state. Parameter names and shapes are BlinkDL's, so state dicts load in the `rwkv` pip package and back unchanged.
This file knows nothing about parallelism: strategies wrap or rebuild the model from outside.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..errors import ShapeError
from ..ops import EMPTY_EXPONENT, WKVState, wkv4
from ..ops.mixing import shift_mix, sigmoid_gate, squared_relu
from .config import RWKVConfig
from .init import init_weights


class RWKVState(NamedTuple):
    """Recurrent state of the whole model, float32 [L, B, D] each.

    att_shift / ffn_shift: the last (layer-normed) input of each mixer, for token shift;
    att_a, att_b, att_p: the WKV state (see rwkv_dist.ops.WKVState)."""

    att_shift: torch.Tensor
    att_a: torch.Tensor
    att_b: torch.Tensor
    att_p: torch.Tensor
    ffn_shift: torch.Tensor

    @staticmethod
    def fresh(cfg: RWKVConfig, batch: int, device: torch.device | str = "cpu") -> "RWKVState":
        zeros = torch.zeros(cfg.n_layer, batch, cfg.n_embd, device=device)
        return RWKVState(zeros, zeros.clone(), zeros.clone(), torch.full_like(zeros, EMPTY_EXPONENT), zeros.clone())

    def layer(self, i: int) -> tuple[torch.Tensor, WKVState, torch.Tensor]:
        return self.att_shift[i], WKVState(self.att_a[i], self.att_b[i], self.att_p[i]), self.ffn_shift[i]

    @staticmethod
    def stack(layers: list[tuple[torch.Tensor, WKVState, torch.Tensor]]) -> "RWKVState":
        att_shift, wkv, ffn_shift = zip(*layers)
        return RWKVState(
            torch.stack(att_shift),
            torch.stack([s.a for s in wkv]),
            torch.stack([s.b for s in wkv]),
            torch.stack([s.p for s in wkv]),
            torch.stack(ffn_shift),
        )


def mix(x: torch.Tensor, previous: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """x * mu + previous * (1 - mu), as one op (a recurrent step's mix; parallel mode runs the fused shift_mix)."""
    return torch.lerp(previous, x, mu)


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        D = cfg.n_embd
        self.layer_id = layer_id
        self.time_decay = nn.Parameter(torch.empty(D))  # w = -exp(time_decay): per-channel decay
        self.time_first = nn.Parameter(torch.empty(D))  # u: bonus for the current token
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, D))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, D))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, D))
        self.key = nn.Linear(D, D, bias=False)
        self.value = nn.Linear(D, D, bias=False)
        self.receptance = nn.Linear(D, D, bias=False)
        self.output = nn.Linear(D, D, bias=False)

    def decay(self) -> torch.Tensor:
        return -torch.exp(self.time_decay.float())  # fp32: bf16 would round decays near 1

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None, wkv_state: WKVState | None):
        k, v, r = self.key_value_receptance(x, shift)
        y, wkv_state = wkv4(self.decay(), self.time_first.float(), k, v, wkv_state)
        return self.output(sigmoid_gate(r, y)), x[:, -1].float(), wkv_state

    def key_value_receptance(self, x: torch.Tensor, shift: torch.Tensor | None):
        """k, v, r at every position of x [B, T, D]; `shift` is the x before the first one (None: zeros)."""
        xk, xv, xr = shift_mix(x, shift, [self.time_mix_k, self.time_mix_v, self.time_mix_r])
        return self.key(xk), self.value(xv), self.receptance(xr)

    def step(self, x: torch.Tensor, shift: torch.Tensor, s: WKVState):
        """One token, x [B, D]: the same recurrence as the WKV kernels, written out for a single step."""
        k = self.key(mix(x, shift, self.time_mix_k[0, 0])).float()
        v = self.value(mix(x, shift, self.time_mix_v[0, 0])).float()
        r = self.receptance(mix(x, shift, self.time_mix_r[0, 0]))
        w, u = self.decay(), self.time_first.float()
        m = torch.maximum(s.p, u + k)
        e1, e2 = torch.exp(s.p - m), torch.exp(u + k - m)
        y = (e1 * s.a + e2 * v) / (e1 * s.b + e2)
        p = torch.maximum(s.p + w, k)
        f1, f2 = torch.exp(s.p + w - p), torch.exp(k - p)
        new = WKVState(f1 * s.a + f2 * v, f1 * s.b + f2, p)
        return self.output(torch.sigmoid(r) * y.to(x.dtype)), x.float(), new


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        D, hidden = cfg.n_embd, cfg.ffn_width
        self.layer_id = layer_id
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, D))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, D))
        self.key = nn.Linear(D, hidden, bias=False)
        self.receptance = nn.Linear(D, D, bias=False)
        self.value = nn.Linear(hidden, D, bias=False)

    def mixer(self, xk: torch.Tensor, xr: torch.Tensor) -> torch.Tensor:
        return sigmoid_gate(self.receptance(xr), self.value(squared_relu(self.key(xk))))

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None):
        return self.mixer(*shift_mix(x, shift, [self.time_mix_k, self.time_mix_r])), x[:, -1].float()

    def step(self, x: torch.Tensor, shift: torch.Tensor):
        shift = shift.to(x.dtype)
        return self.mixer(mix(x, shift, self.time_mix_k[0, 0]), mix(x, shift, self.time_mix_r[0, 0])), x.float()


class Block(nn.Module):
    time_mix, channel_mix = TimeMix, ChannelMix  # the mixers' classes (a tensor-parallel block swaps in its own)

    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        D, eps = cfg.n_embd, cfg.layer_norm_eps
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(D, eps=eps)  # normalizes the embedding
        self.ln1 = nn.LayerNorm(D, eps=eps)
        self.ln2 = nn.LayerNorm(D, eps=eps)
        self.att = self.time_mix(cfg, layer_id)
        self.ffn = self.channel_mix(cfg, layer_id)

    def forward(self, x: torch.Tensor, state=None):
        att_shift, wkv_state, ffn_shift = state if state is not None else (None, None, None)
        if self.layer_id == 0:
            x = self.ln0(x)
        att, att_shift, wkv_state = self.att(self.ln1(x), att_shift, wkv_state)
        x = x + att
        ffn, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + ffn, (att_shift, wkv_state, ffn_shift)

    def step(self, x: torch.Tensor, state):
        att_shift, wkv_state, ffn_shift = state
        if self.layer_id == 0:
            x = self.ln0(x)
        att, att_shift, wkv_state = self.att.step(self.ln1(x), att_shift, wkv_state)
        x = x + att
        ffn, ffn_shift = self.ffn.step(self.ln2(x), ffn_shift)
        return x + ffn, (att_shift, wkv_state, ffn_shift)


class RWKV(nn.Module):
    block = Block  # the blocks' class (a context-parallel model swaps in its own)

    def __init__(self, cfg: RWKVConfig, init: bool = True):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(self.block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if init and not any(p.is_meta for p in self.parameters()):
            init_weights(self)

    def forward(self, tokens: torch.Tensor, state: RWKVState | None = None, return_state: bool = False):
        """Parallel mode: tokens [B, T] -> logits [B, T, V] (and the state after the last token if asked)."""
        _check_tokens(tokens, self.cfg, ndim=2)
        x = self.emb(tokens)
        new_layers = []
        for i, block in enumerate(self.blocks):
            x, layer_state = block(x, None if state is None else state.layer(i))
            new_layers.append(layer_state)
        logits = self.head(self.ln_out(x))
        return (logits, RWKVState.stack(new_layers)) if (return_state or state is not None) else logits

    @torch.no_grad()
    def for_decoding(self) -> "RWKV":
        """Lay every matrix out column-major in place (same shapes, values and state-dict names), so that a batch-1
        step reads each weight as x @ W^T over contiguous rows of W^T: ~20% more tokens/s on CPU, measured in
        bench/decode.py (the `rwkv` pip package transposes its weights at load for the same reason). Returns self."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()
        return self

    def step(self, tokens: torch.Tensor, state: RWKVState | None = None) -> tuple[torch.Tensor, RWKVState]:
        """Recurrent mode: tokens [B] -> logits [B, V] and the new state; state=None starts fresh."""
        _check_tokens(tokens, self.cfg, ndim=1)
        if state is None:
            state = RWKVState.fresh(self.cfg, tokens.shape[0], tokens.device)
        x = self.emb(tokens)
        new_layers = []
        for i, block in enumerate(self.blocks):
            x, layer_state = block.step(x, state.layer(i))
            new_layers.append(layer_state)
        return self.head(self.ln_out(x)), RWKVState.stack(new_layers)


def _check_tokens(tokens: torch.Tensor, cfg: RWKVConfig, ndim: int) -> None:
    shape = "[B, T]" if ndim == 2 else "[B]"
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != ndim:
        raise ShapeError(f"RWKV: tokens must be a {shape} integer tensor, got {getattr(tokens, 'shape', type(tokens))}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ShapeError(f"RWKV: tokens must be int64 or int32, got {tokens.dtype}")
