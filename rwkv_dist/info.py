"""Size facts of a model config, counted on the meta device so that even 14B allocates nothing."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import load_model_file
from .model import RWKV


def model_info(path: str | Path) -> dict:
    cfg = load_model_file(path).model
    with torch.device("meta"):
        model = RWKV(cfg, init=False)
    params = sum(p.numel() for p in model.parameters())
    assert params == cfg.num_params(), "closed-form count disagrees with the module"
    fwd = cfg.flops_per_token_fwd()
    return {
        "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "vocab_size": cfg.vocab_size,
        "ctx_len": cfg.ctx_len,
        "params": params,
        "flops_per_token_fwd": fwd,
        "flops_per_token_train": 3 * fwd,
        "bytes_fp32": 4 * params,
        "bytes_bf16": 2 * params,
    }
