"""Export to the formats the RWKV world uses: BlinkDL `.pth` (rwkv pip, ChatRWKV, RWKV-Runner) and HF `RwkvForCausalLM`."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import CheckpointError
from .model.config import RWKVConfig
from .model.state_dict import check_state_dict, config_from_state_dict, read_state_dict

FORMATS = ("blinkdl", "hf")

# BlinkDL name fragment -> transformers' RwkvForCausalLM name fragment (shapes and the raw time_decay are the same).
_HF_RENAMES = [
    (r"^emb\.", "rwkv.embeddings."),
    (r"^blocks\.", "rwkv.blocks."),
    (r"^ln_out\.", "rwkv.ln_out."),
    (r"\.ln0\.", ".pre_ln."),
    (r"\.att\.", ".attention."),
    (r"\.ffn\.", ".feed_forward."),
    (r"\.time_mix_k$", ".time_mix_key"),
    (r"\.time_mix_v$", ".time_mix_value"),
    (r"\.time_mix_r$", ".time_mix_receptance"),
]


def hf_name(blinkdl_name: str) -> str:
    for pattern, replacement in _HF_RENAMES:
        blinkdl_name = re.sub(pattern, replacement, blinkdl_name)
    return blinkdl_name


def hf_config(cfg: RWKVConfig) -> dict:
    return {
        "architectures": ["RwkvForCausalLM"],
        "model_type": "rwkv",
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.ctx_len,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "attention_hidden_size": cfg.n_embd,
        "intermediate_size": cfg.ffn_width,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        # HF halves activations every `rescale_every` layers at inference (an fp16 overflow guard); 0 keeps logits exact.
        "rescale_every": 0,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "use_cache": True,
    }


def export_state_dict(sd: dict[str, torch.Tensor], fmt: str, out: str | Path, dtype: torch.dtype | None = None,
                      source: str = "state dict", ctx_len: int = 1024) -> Path:
    """Write `sd` (BlinkDL names) as `fmt` to `out`, atomically: a failed export leaves no half-written output."""
    if fmt not in FORMATS:
        raise CheckpointError(f"export: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    cfg = config_from_state_dict(sd, source, ctx_len=ctx_len)
    from .model.rwkv import RWKV

    with torch.device("meta"):
        expected = RWKV(cfg, init=False).state_dict()
    check_state_dict(sd, expected, source)
    sd = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in sd.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if fmt == "blinkdl":
            torch.save(sd, staging / "model.pth")
            os.replace(staging / "model.pth", out)
        else:
            from safetensors.torch import save_file

            save_file({hf_name(k): v for k, v in sd.items()}, str(staging / "model.safetensors"), metadata={"format": "pt"})
            (staging / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def export_file(src: str | Path, fmt: str, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    return export_state_dict(read_state_dict(src), fmt, out, dtype=dtype, source=str(src))
