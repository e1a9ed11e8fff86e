"""Fast recurrent decoding: `Decoder(model).step(tokens, state)`, the same function as `RWKV.step`, laid out for speed.

A batch-1 RWKV step is a chain of matrix-vector products (13·D² weights per block plus the V×D head), so its speed
is the rate at which the weights stream from memory. `Decoder` packs the model's weights once, at construction:

- every matrix-vector product in one kernel (csrc/gemv_cpu.cpp: each output's weight row read once, contiguously, and
  used by every batch row while it sits in L1; torch's CPU products ran these shapes 1.7-3x slower, and its bf16 and
  int8 ones were no faster than fp32), and TimeMix's key / value / receptance as three groups of one call;
- the three (TimeMix) and two (ChannelMix) token-shift mixes computed as one `lerp` each against stacked mu's;
- -exp(time_decay) and time_first precomputed in fp32; the new state written in place of fresh tensors.

Weights are stored as `weights="fp32"` (the default), `"bf16"` or `"int8"` (symmetric, one fp32 scale per output row:
w ~= scale * q, q in [-127, 127]); the kernel widens each weight in registers and does all math in fp32. Half or a
quarter of the bytes per token, so up to 2x / 4x the fp32 rate where the step is bound by memory; bf16 rounds each
weight to 8 significant bits, int8 to 1/254 of its row's largest magnitude.

RWKV.step stays the reference: with fp32 weights the fast step equals it to ~1e-6 relative (only the order of the
sums inside the products differs), for any batch, from a fresh or a prefilled state. The state is an `RWKVState`,
interchangeable with RWKV.step's and with parallel mode's (prefill with `model(tokens, return_state=True)`); `step`
never modifies the state it is given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError, ShapeError
from ..ops._build import cpu_extension, cpu_kernels_available
from .rwkv import RWKV, RWKVState, _check_tokens

WEIGHT_FORMATS = ("fp32", "bf16", "int8")


class Decoder:
    """A model's weights packed for recurrent decoding; `step(tokens [B], state)` -> (logits [B, V] fp32, state)."""

    def __init__(self, model: RWKV, weights: str = "fp32"):
        if type(model).block is not RWKV.block:
            raise ShapeError(f"Decoder: packs a plain RWKV model, got {type(model).__name__}")
        if weights not in WEIGHT_FORMATS:
            raise ConfigError(f"Decoder: weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
        self.weights = weights
        self._gemv = cpu_extension().gemv if cpu_kernels_available() else None  # decided once, not per product
        self.cfg = model.cfg
        self.eps = model.cfg.layer_norm_eps
        with torch.no_grad():
            self.emb = f32(model.emb.weight)
            self.layers = []
            for block in model.blocks:
                att, ffn = block.att, block.ffn
                layer = {
                    "ln1": (f32(block.ln1.weight), f32(block.ln1.bias)),
                    "ln2": (f32(block.ln2.weight), f32(block.ln2.bias)),
                    "att_mu": f32(torch.stack([att.time_mix_k.flatten(), att.time_mix_v.flatten(),
                                               att.time_mix_r.flatten()])[:, None, :]),  # [3, 1, D]
                    "w": f32(att.decay()),
                    "u": f32(att.time_first),
                    "ffn_mu": f32(torch.stack([ffn.time_mix_k.flatten(), ffn.time_mix_r.flatten()])[:, None, :]),
                }
                layer["kvr"] = self._pack(att.key.weight, att.value.weight, att.receptance.weight)
                layer["out"] = self._pack(att.output.weight)
                layer["ffn_k"] = self._pack(ffn.key.weight)
                layer["ffn_r"] = self._pack(ffn.receptance.weight)
                layer["ffn_v"] = self._pack(ffn.value.weight)
                if block.layer_id == 0:
                    layer["ln0"] = (f32(block.ln0.weight), f32(block.ln0.bias))
                self.layers.append(layer)
            self.ln_out = (f32(model.ln_out.weight), f32(model.ln_out.bias))
            self.head = self._pack(model.head.weight)

    def _pack(self, *matrices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """nn.Linear weights [out, in] (several: stacked as groups, each applied to its own input) -> the gemv
        kernel's operands: [G, out, in] in the storage dtype (x @ W^T reads each output's row contiguously), and for
        int8 the per-row scales [G, out]."""
        w = torch.stack([m.detach().to(device="cpu", dtype=torch.float32) for m in matrices])
        if self.weights != "int8":
            return (w.to(torch.bfloat16 if self.weights == "bf16" else torch.float32).contiguous(),)
        scale = (w.abs().amax(dim=2) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8).contiguous(), scale.contiguous()

    def _product(self, packed: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        """x [G, B, in] fp32 -> x @ W_g^T for each group g: [G, B, out] fp32. Without the CPU kernels (no compiler,
        warned once) the same products in torch: the weights widened to fp32, int8 rows times their scales."""
        if self._gemv is not None:
            return self._gemv(x.contiguous(), *packed)
        y = torch.bmm(x, packed[0].float().transpose(1, 2))
        return y * packed[1][:, None, :] if len(packed) == 2 else y

    def weight_bytes(self) -> int:
        """Bytes of weights one step reads (every matrix and vector; one embedding row per token, not the table)."""
        tensors = [self.ln_out[0], self.ln_out[1], *self.head]
        for layer in self.layers:
            for value in layer.values():
                tensors.extend(value if isinstance(value, tuple) else [value])
        return sum(t.numel() * t.element_size() for t in tensors) + self.emb.shape[1] * self.emb.element_size()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, state: RWKVState | None = None) -> tuple[torch.Tensor, RWKVState]:
        """tokens [B] -> logits [B, V] fp32 and the new state (state=None starts fresh; the given one is kept)."""
        _check_tokens(tokens, self.cfg, ndim=1)
        B, D = tokens.shape[0], self.cfg.n_embd
        if state is None:
            state = RWKVState.fresh(self.cfg, B)
        if state.att_shift.shape[1] != B:
            raise ShapeError(f"Decoder: a state of batch {state.att_shift.shape[1]} for {B} tokens")
        new = RWKVState(*(torch.empty_like(s) for s in state))
        eps = self.eps
        x = self.emb[tokens]
        for i, L in enumerate(self.layers):
            if i == 0:
                x = F.layer_norm(x, (D,), *L["ln0"], eps)
            xx = F.layer_norm(x, (D,), *L["ln1"], eps)
            new.att_shift[i].copy_(xx)
            xm = torch.lerp(state.att_shift[i], xx, L["att_mu"])  # [3, B, D]: the key, value, receptance inputs
            k, v, r = self._product(L["kvr"], xm)
            a, b, p = state.att_a[i], state.att_b[i], state.att_p[i]
            uk = k + L["u"]
            m = torch.maximum(p, uk)
            e1, e2 = torch.exp(p - m), torch.exp(uk - m)
            y = torch.addcmul(e2 * v, e1, a).div_(torch.addcmul(e2, e1, b))
            pw = p + L["w"]
            q = torch.maximum(pw, k, out=new.att_p[i])
            f1, f2 = torch.exp(pw - q), torch.exp(k - q)
            torch.addcmul(f2 * v, f1, a, out=new.att_a[i])
            torch.addcmul(f2, f1, b, out=new.att_b[i])
            x = x + self._product(L["out"], torch.sigmoid_(r).mul_(y)[None])[0]
            xx = F.layer_norm(x, (D,), *L["ln2"], eps)
            new.ffn_shift[i].copy_(xx)
            xk, xr = torch.lerp(state.ffn_shift[i], xx, L["ffn_mu"])
            kk = torch.relu_(self._product(L["ffn_k"], xk[None])[0]).square_()
            x = x + torch.sigmoid_(self._product(L["ffn_r"], xr[None])[0]).mul_(self._product(L["ffn_v"], kk[None])[0])
        return self._product(self.head, F.layer_norm(x, (D,), *self.ln_out, eps)[None])[0], new


def f32(t: torch.Tensor) -> torch.Tensor:
    """A packed copy: fp32, on the CPU, contiguous."""
    return t.detach().to(device="cpu", dtype=torch.float32).clone(memory_format=torch.contiguous_format)

