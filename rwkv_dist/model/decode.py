"""Fast recurrent decoding: `Decoder(model).step(tokens, state)`, the same function as `RWKV.step`, laid out for speed.

A batch-1 RWKV step is a chain of matrix-vector products (13·D² weights per block plus the V×D head), so its speed
is the rate at which the weights stream from memory. `Decoder` packs the model's weights once, at construction:

- every matrix pre-transposed to [in, out] (x @ W^T reads contiguous rows of W^T), and TimeMix's key / value /
  receptance stacked into one [3, D, D] tensor so a single batched product (`torch.bmm`) reads all three;
- the three (TimeMix) and two (ChannelMix) token-shift mixes computed as one `lerp` each against stacked mu's;
- -exp(time_decay) and time_first precomputed in fp32; the new state written in place of fresh tensors.

fp32 only: torch's CPU bf16 matrix-vector products are not faster than fp32 ones on the machines measured
(bench/results/decode.txt), so bf16 weight storage would need its own kernel.

RWKV.step stays the reference: with fp32 weights the fast step equals it to ~1e-6 relative (only the order of the
sums inside the products differs), for any batch, from a fresh or a prefilled state. The state is an `RWKVState`,
interchangeable with RWKV.step's and with parallel mode's (prefill with `model(tokens, return_state=True)`); `step`
never modifies the state it is given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ShapeError
from .rwkv import RWKV, RWKVState, _check_tokens

class Decoder:
    """A model's weights packed for recurrent decoding; `step(tokens [B], state)` -> (logits [B, V] fp32, state)."""

    def __init__(self, model: RWKV):
        if type(model).block is not RWKV.block:
            raise ShapeError(f"Decoder: packs a plain RWKV model, got {type(model).__name__}")
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
                # x @ W^T over contiguous [in, out] rows; key / value / receptance as one [3, D, D] bmm
                layer["kvr"] = f32(torch.stack([att.key.weight.t(), att.value.weight.t(), att.receptance.weight.t()]))
                layer["out"] = f32(att.output.weight.t())
                layer["ffn_k"] = f32(ffn.key.weight.t())
                layer["ffn_r"] = f32(ffn.receptance.weight.t())
                layer["ffn_v"] = f32(ffn.value.weight.t())
                if block.layer_id == 0:
                    layer["ln0"] = (f32(block.ln0.weight), f32(block.ln0.bias))
                self.layers.append(layer)
            self.ln_out = (f32(model.ln_out.weight), f32(model.ln_out.bias))
            self.head = f32(model.head.weight.t())

    def weight_bytes(self) -> int:
        """Bytes of weights one step reads (every matrix and vector; one embedding row per token, not the table)."""
        tensors = [self.ln_out[0], self.ln_out[1], self.head]
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
            k, v, r = torch.bmm(xm, L["kvr"])
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
            x = x + torch.mm(torch.sigmoid_(r).mul_(y), L["out"])
            xx = F.layer_norm(x, (D,), *L["ln2"], eps)
            new.ffn_shift[i].copy_(xx)
            xk, xr = torch.lerp(state.ffn_shift[i], xx, L["ffn_mu"])
            kk = torch.relu_(torch.mm(xk, L["ffn_k"])).square_()
            x = x + torch.sigmoid_(torch.mm(xr, L["ffn_r"])).mul_(torch.mm(kk, L["ffn_v"]))
        return torch.mm(F.layer_norm(x, (D,), *self.ln_out, eps), self.head), new


def f32(t: torch.Tensor) -> torch.Tensor:
    """A packed copy: fp32, on the CPU, contiguous in its current layout (so a transposed view becomes [in, out])."""
    return t.detach().to(device="cpu", dtype=torch.float32).clone(memory_format=torch.contiguous_format)

