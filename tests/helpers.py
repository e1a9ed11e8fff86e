"""Shared test fixtures that are plain functions (imported by the test modules)."""

from __future__ import annotations

import subprocess
import sys

import torch

from rwkv_dist.model import RWKV, RWKVConfig


def random_model(seed: int = 0, n_layer: int = 3, n_embd: int = 32, vocab_size: int = 64, **kw) -> RWKV:
    """The paper's init plus noise on every weight: zero-initialized matrices would hide bugs in their paths."""
    torch.manual_seed(seed)
    model = RWKV(RWKVConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if p.dim() == 2 else 0.2
            p.add_(torch.randn_like(p) * scale)
            if "time_mix" in name:
                p.clamp_(0, 1)
    return model.eval()


def run_cli(*args) -> subprocess.CompletedProcess:
    """`rwkv-dist ARGS...` in a fresh interpreter, output captured."""
    return subprocess.run([sys.executable, "-m", "rwkv_dist.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
