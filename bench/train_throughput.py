"""CPU training throughput of RWKV-4 against a GPT of about the same size, per context length, in one process.

    .venv/bin/python bench/train_throughput.py [--n-layer 4 --n-embd 256 --vocab 2048] [--contexts 1024 4096]
                                               [--tokens-per-step 4096] [--rounds 5] [--steps 1]

One training step is forward + cross entropy on random tokens + backward + torch.optim.AdamW step, fp32, on all the
machine's cores unless --threads says otherwise. The cross entropy is the trainer's (rwkv_dist.train.loss.lm_loss,
without L2Wrap: its fused CPU kernel) for both models; --torch-loss gives both F.cross_entropy instead, whose
[N, V] passes cost ~40 ms more of a step at ctx 8192 here (the issue's first figures were measured with it).
Both models get the same tokens per step (batch = tokens-per-step / context: 4 at 1024, 1 at 4096).
The GPT baseline is defined here: pre-LayerNorm, learned positional embedding, causal self-attention through
F.scaled_dot_product_attention with n_embd/64 heads, 4x GELU MLP, untied head; with the same L and D its parameter
count is RWKV's within a few percent (RWKV-4 blocks hold 13 D^2 matmul weights, GPT blocks 12 D^2; the positional
table adds T*D, a lookup that costs no FLOPs). After --warmup steps each, RWKV and GPT rounds alternate, so that
machine noise hits both alike; medians are reported. The analytic FLOPs per token show why the ratio grows with T:
both pay ~6N for their matmul weights, but attention adds 12*L*T*D per token while RWKV's WKV adds O(L*D) whatever T.
That 12*L*T*D is the full T x T score matrix; a causal kernel (SDPA's flash path on CPU) computes only its lower
triangle, 6*L*T*D, so the "causal FLOP ratio" column is the one a GPT's real work is measured by: a tokens/s ratio
above it means RWKV runs at more FLOP/s than the GPT.
Both models run under the trainer's allocator setting (rwkv_dist.train.hardware.keep_freed_cpu_memory: freed
activations are reused instead of page-faulted in fresh each step); --default-malloc leaves glibc's defaults.
On a machine whose cores are shared with other work, every multi-threaded op waits for its slowest thread, which hurts
the model with more small ops (RWKV's elementwise mixing) most; compare a run with --threads 1 before reading much
into the ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from rwkv_dist.model import RWKV, RWKVConfig  # noqa: E402
from rwkv_dist.train.hardware import keep_freed_cpu_memory  # noqa: E402
from rwkv_dist.train.loss import lm_loss  # noqa: E402

LOSSES = {  # --torch-loss picks "torch"
    "trainer": lambda logits, targets: lm_loss(logits, targets, l2wrap=False),
    "torch": F.cross_entropy,
}
MALLOC = {True: "keeps freed memory (as the trainer)", False: "as glibc defaults"}

# WKV forward + backward (which recomputes the forward from checkpoints), elementwise ops per token, layer and channel,
# counting exp, max and division as one each. Rough, and tiny next to the matmuls; it is here to show it is O(L*D).
WKV_FLOPS_PER_ELEMENT = 80
TARGETS = {1024: 1.2, 8192: 4.0}  # RWKV/GPT tokens/s that issue 14 asks for at these contexts


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D/H]
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class GPTBlock(nn.Module):
    def __init__(self, d: int, n_head: int, hidden: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Pre-LayerNorm GPT: tokens [B, T] -> logits [B, T, V]."""

    def __init__(self, n_layer: int, n_embd: int, vocab_size: int, ctx_len: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.n_head = gpt_heads(n_embd)
        self.hidden = round(mlp_ratio * n_embd)
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(ctx_len, n_embd)
        self.blocks = nn.ModuleList(GPTBlock(n_embd, self.n_head, self.hidden) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        for name, p in self.named_parameters():  # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2L)
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def gpt_heads(d: int) -> int:
    """n_embd / 64 heads (at least one), lowered until it divides n_embd."""
    heads = max(1, d // 64)
    while d % heads:
        heads -= 1
    return heads


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gpt_matmul_params(L: int, D: int, V: int, hidden: int) -> int:
    """The weights a token is multiplied by (embeddings are lookups): qkv, proj, MLP per block, and the head."""
    return L * (4 * D * D + 2 * D * hidden) + V * D


def train_rate(model: nn.Module, opt: torch.optim.Optimizer, data: torch.Tensor, vocab: int, steps: int,
               loss_fn=LOSSES["trainer"]) -> float:
    """Tokens per second over `steps` training steps on data [B, T + 1] (inputs data[:, :-1], targets data[:, 1:])."""
    inputs, targets = data[:, :-1], data[:, 1:].reshape(-1)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs).view(-1, vocab), targets)
        loss.backward()
        opt.step()
    return steps * inputs.numel() / (time.perf_counter() - start)


def matmul_floor(model: nn.Module, tokens: int, reps: int = 3) -> float:
    """Seconds for the matrix products of one training step alone, best of `reps`: for every nn.Linear of the model,
    its forward x @ W^T, its input gradient dy @ W and its weight gradient dy^T @ x at `tokens` rows, on fresh
    operands of the step's shapes. Everything else the step does (WKV, mixing, LayerNorm, loss, AdamW) counts zero
    here, so the GPT's step time over this bounds the tokens/s ratio any RWKV implementation on torch's GEMM can reach."""
    products = []
    for linear in (m for m in model.modules() if isinstance(m, nn.Linear)):
        w = torch.randn(linear.out_features, linear.in_features)
        x, dy = torch.randn(tokens, linear.in_features), torch.randn(tokens, linear.out_features)
        products += [lambda x=x, w=w: x @ w.t(), lambda dy=dy, w=w: dy @ w, lambda dy=dy, x=x: dy.t() @ x]
    best = math.inf
    for _ in range(reps + 1):  # the first pass warms MKL's buffers up
        start = time.perf_counter()
        for product in products:
            product()
        best = min(best, time.perf_counter() - start)
    return best


class _TimedLinear(torch.autograd.Function):
    """x @ W^T with the same three products as nn.Linear's autograd (forward; dy @ W and dy^T @ x backward), each
    timed with perf_counter into `seconds` [0]: the step's matmul time measured inside the step itself."""

    seconds = [0.0]

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        start = time.perf_counter()
        y = x @ w.t()
        _TimedLinear.seconds[0] += time.perf_counter() - start
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        start = time.perf_counter()
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx, dw = (dy2 @ w).view(*x.shape[:-1], w.shape[1]), dy2.t() @ x.reshape(-1, x.shape[-1])
        _TimedLinear.seconds[0] += time.perf_counter() - start
        return dx, dw


def matmuls_in_step(model: nn.Module, opt: torch.optim.Optimizer, data: torch.Tensor, vocab: int, steps: int, loss_fn):
    """(matmul seconds, step seconds) per training step, medians over `steps`, with every (bias-free) nn.Linear's
    products timed where they run: unlike matmul_floor this sees the step's real operands, caches and threads."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(m.bias is None for m in linears), "RWKV's linears have no bias"
    for linear in linears:
        linear.forward = lambda x, linear=linear: _TimedLinear.apply(x, linear.weight)
    try:
        shares = []
        for _ in range(steps + 1):  # the first step runs the new autograd graph once
            _TimedLinear.seconds[0] = 0.0
            step = data[:, :-1].numel() / train_rate(model, opt, data, vocab, 1, loss_fn)
            shares.append((_TimedLinear.seconds[0], step))
        return statistics.median(s[0] for s in shares[1:]), statistics.median(s[1] for s in shares[1:])
    finally:
        for linear in linears:
            del linear.forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--tokens-per-step", type=int, default=4096, help="batch = max(1, this // context)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1, help="training steps per timed round")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps per model first: at ctx 8192 RWKV's first two or three steps still "
                             "page-fault 15k-80k pages in while the heap settles (0 from then on), a trainer's steady state")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: this process's cores")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (the trainer, and by default this bench, keep freed memory)")
    parser.add_argument("--matmul-floor", action="store_true",
                        help="also time RWKV's matrix products per context, alone and inside its steps: the ratio's ceiling here")
    parser.add_argument("--torch-loss", action="store_true",
                        help="F.cross_entropy for both models instead of the trainer's fused loss")
    parser.add_argument("--gpt-mlp-ratio", type=float, default=4.0, help="GPT MLP width / D; 4.5 matches RWKV's 13 D^2")
    args = parser.parse_args()
    L, D, V = args.n_layer, args.n_embd, args.vocab
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(args.threads or cores)
    kept = not args.default_malloc and keep_freed_cpu_memory()
    loss_fn = LOSSES["torch" if args.torch_loss else "trainer"]

    rwkv_cfg = RWKVConfig(n_layer=L, n_embd=D, vocab_size=V, ctx_len=max(args.contexts))
    rwkv_params = rwkv_cfg.num_params()
    rwkv_matmul = rwkv_cfg.flops_per_token_fwd() // 2
    hidden = round(args.gpt_mlp_ratio * D)
    gpt_matmul = gpt_matmul_params(L, D, V, hidden)

    rows = []
    gpt_params = {}
    for ctx in args.contexts:
        batch = max(1, args.tokens_per_step // ctx)
        data = torch.randint(0, V, (batch, ctx + 1), generator=torch.Generator().manual_seed(ctx))
        torch.manual_seed(0)
        rwkv = RWKV(RWKVConfig(n_layer=L, n_embd=D, vocab_size=V, ctx_len=ctx)).train()
        gpt = GPT(L, D, V, ctx, args.gpt_mlp_ratio).train()
        assert count(rwkv) == rwkv_params, (count(rwkv), rwkv_params)
        gpt_params[ctx] = count(gpt)
        runs = {
            "rwkv": (rwkv, torch.optim.AdamW(rwkv.parameters(), lr=1e-4)),
            "gpt": (gpt, torch.optim.AdamW(gpt.parameters(), lr=1e-4)),
        }
        for model, opt in runs.values():  # warm-up: the WKV kernel's load, AdamW's state, the allocator's pools
            train_rate(model, opt, data, V, args.warmup, loss_fn)
        rates = {name: [] for name in runs}
        for _ in range(args.rounds):  # alternate, so that machine noise hits both alike; report medians
            for name, (model, opt) in runs.items():
                rates[name].append(train_rate(model, opt, data, V, args.steps, loss_fn))
        rwkv_flops = 6 * rwkv_matmul + WKV_FLOPS_PER_ELEMENT * L * D
        gpt_flops = 6 * gpt_matmul + 12 * L * ctx * D
        rwkv_rate, gpt_rate = statistics.median(rates["rwkv"]), statistics.median(rates["gpt"])
        matmuls = None  # (seconds alone, (seconds inside the step, step seconds))
        if args.matmul_floor:
            matmuls = matmul_floor(rwkv, batch * ctx), matmuls_in_step(*runs["rwkv"], data, V, args.rounds, loss_fn)
        rows.append((ctx, batch, rwkv_rate, gpt_rate, rwkv_flops, gpt_flops, matmuls))
        del runs, rwkv, gpt

    print(
        f"Training step (fwd + bwd + AdamW), fp32, CPU, L{L} D{D} V{V}, {args.tokens_per_step} tokens/step, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} x {args.steps} step(s) after {args.warmup} warm-up, "
        f"malloc {MALLOC[kept]}, loss {'F.cross_entropy' if args.torch_loss else 'lm_loss (fused kernel)'}"
    )
    print(f"params  RWKV {rwkv_params:,} (matmul {rwkv_matmul:,})")
    gpt_counts = ", ".join(f"{gpt_params[c]:,} at ctx {c} ({gpt_params[c] / rwkv_params - 1:+.1%})" for c in args.contexts)
    gpt_shape = f"{gpt_heads(D)} heads, MLP {hidden}"
    print(f"params  GPT  {gpt_counts}; matmul {gpt_matmul:,} ({gpt_matmul / rwkv_matmul - 1:+.1%}), {gpt_shape}")
    print(
        f"FLOPs/token: RWKV 6N + {WKV_FLOPS_PER_ELEMENT}*L*D (WKV, rough); GPT 6N + 12*L*T*D (attention); "
        "N = matmul params"
    )
    print(
        f"{'context':>8s}{'batch':>6s}{'RWKV tok/s':>12s}{'GPT tok/s':>11s}{'ratio':>8s}"
        f"{'RWKV MFLOP/tok':>16s}{'GPT MFLOP/tok':>15s}{'FLOP ratio':>12s}{'causal FLOP ratio':>19s}"
    )
    for ctx, batch, rwkv_rate, gpt_rate, rwkv_flops, gpt_flops, _ in rows:
        print(
            f"{ctx:8d}{batch:6d}{rwkv_rate:12.0f}{gpt_rate:11.0f}{rwkv_rate / gpt_rate:7.2f}x"
            f"{rwkv_flops / 1e6:16.1f}{gpt_flops / 1e6:15.1f}{gpt_flops / rwkv_flops:11.2f}x"
            f"{(gpt_flops - 6 * L * ctx * D) / rwkv_flops:18.2f}x"
        )
    print("ratio = RWKV tok/s / GPT tok/s; FLOP ratio = GPT / RWKV FLOPs per token (the ratio at equal FLOP/s); "
          "causal: attention's lower triangle only")
    for ctx, batch, rwkv_rate, gpt_rate, _, _, matmuls in rows:
        if matmuls is None:
            continue
        (alone, (inside, timed_step)), tokens = matmuls, batch * ctx
        step, gpt_step = tokens / rwkv_rate, tokens / gpt_rate
        gflops = 6 * rwkv_matmul * tokens / 1e9
        print(
            f"ctx {ctx}: RWKV's matmuls alone {alone:.3f} s/step ({gflops / alone:.0f} GFLOP/s)"
            f" of its {step:.3f} s step; with everything else at zero the ratio could reach "
            f"{gpt_step / alone:.2f}x (GPT step {gpt_step:.3f} s)"
        )
        needs = ""
        if ctx in TARGETS:  # what the rest of the step may take for the ratio at this context
            target = TARGETS[ctx]
            budget = gpt_step / target - inside
            needs = (f"; {target}x needs the rest under {budget:.3f} s" if budget > 0
                     else f"; {target}x is out of reach: matmuls > GPT step / {target}")
        print(
            f"ctx {ctx}: timed inside RWKV's steps, its matmuls took {inside:.3f} s ({gflops / inside:.0f} GFLOP/s) of "
            f"{timed_step:.3f} s, the rest {timed_step - inside:.3f} s: ceiling {gpt_step / inside:.2f}x{needs}"
        )


if __name__ == "__main__":
    main()
