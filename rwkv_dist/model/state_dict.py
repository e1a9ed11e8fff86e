"""Reading BlinkDL-format RWKV-4 state dicts: infer the shape, check every key, load without unpickling code."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from .config import RWKVConfig
from .rwkv import RWKV

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A `.pth` (torch.save of a dict of tensors; loaded with weights_only, never executing pickled code) or `.safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is the same user-facing problem
        raise CheckpointError(f"{path}: not a readable state dict: {describe_load_failure(e)}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    return sd


def describe_load_failure(e: BaseException) -> str:
    """A failed weights-only load in a few words: the global it refused (a file that would run code when unpickled),
    or, when it refused none, that the file is truncated or damaged. Never torch's own first line, which advises
    retrying with weights_only=False: for an untrusted file, running its code."""
    refused = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
    if refused:
        name = refused[0].split(" was not")[0].removeprefix("WeightsUnpickler error: ")
        return f"refused to load, not weights-only ({name[:200]})"
    first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
    return f"unreadable, truncated or damaged ({type(e).__name__}: {first[:200]})"


def config_from_state_dict(sd: dict[str, torch.Tensor], source: str = "state dict", **overrides) -> RWKVConfig:
    """The RWKVConfig whose model has exactly these shapes (n_layer, n_embd, vocab_size, dim_ffn)."""
    for key in ("emb.weight", "blocks.0.ffn.key.weight"):
        if key not in sd:
            raise CheckpointError(f"{source}: missing key {key!r}; not an RWKV-4 state dict in BlinkDL format")
    vocab_size, n_embd = sd["emb.weight"].shape
    n_layer = 1 + max(int(m.group(1)) for m in map(_BLOCK_KEY.match, sd) if m)
    dim_ffn = sd["blocks.0.ffn.key.weight"].shape[0]
    fields = dict(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, dim_ffn=dim_ffn)
    return RWKVConfig(**{**fields, **overrides})


def check_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """One clear error for missing, extra or mis-shaped keys (the first few of each are named)."""
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    problems = []
    for what, items in (("missing keys", missing), ("unexpected keys", extra), ("wrong shapes", shapes)):
        if items:
            problems.append(f"{what} ({len(items)}): {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}")
    if problems:
        raise CheckpointError(f"{source}: does not fit RWKV-4: {'; '.join(problems)}")


def load_rwkv(sd: dict[str, torch.Tensor], source: str = "state dict", dtype: torch.dtype | None = torch.float32) -> RWKV:
    """A model holding exactly these weights (official RWKV-4 `.pth` files load here to continue pretraining).

    dtype=None keeps each tensor's own dtype (official releases are bf16/fp16); training wants float32 masters."""
    cfg = config_from_state_dict(sd, source)
    with torch.device("meta"):
        model = RWKV(cfg, init=False)
    check_state_dict(sd, model.state_dict(), source)
    model.load_state_dict({k: v if dtype is None else v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model
