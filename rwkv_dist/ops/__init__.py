"""WKV operator: `y, state = wkv4(w, u, k, v, state=None)`; backends picked automatically (CUDA, CPU kernel, reference)."""

from .state import EMPTY_EXPONENT, WKVState
from .wkv import wkv4

__all__ = ["wkv4", "WKVState", "EMPTY_EXPONENT"]
