"""The RWKV-4 model: `RWKV(RWKVConfig(n_layer=..., n_embd=..., vocab_size=...))`."""

from .config import RWKVConfig
from .rwkv import RWKV, RWKVState

__all__ = ["RWKV", "RWKVConfig", "RWKVState"]
