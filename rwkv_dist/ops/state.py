"""The WKV recurrent state carried between segments and decoding steps."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import errors

# Running exponent of an empty state: "minus infinity", kept finite so that differences of exponents stay finite.
EMPTY_EXPONENT = -1e38


class WKVState(NamedTuple):
    """Scaled sums of the recurrence, each float32 [B, C]: numerator A = a * e^p, denominator B = b * e^p."""

    a: torch.Tensor
    b: torch.Tensor
    p: torch.Tensor

    @staticmethod
    def fresh(batch: int, channels: int, device: torch.device | str = "cpu", dtype=torch.float32) -> "WKVState":
        zeros = torch.zeros(batch, channels, device=device, dtype=dtype)
        return WKVState(zeros, zeros.clone(), torch.full_like(zeros, EMPTY_EXPONENT))

    def check(self, batch: int, channels: int, device: torch.device) -> None:
        for name, x in zip(self._fields, self):
            if not isinstance(x, torch.Tensor):
                raise errors.ShapeError(f"wkv4: state.{name} must be a tensor, got {type(x).__name__}")
            if tuple(x.shape) != (batch, channels):
                raise errors.ShapeError(f"wkv4: state.{name} has shape {tuple(x.shape)}, expected ({batch}, {channels})")
            if x.dtype not in (torch.float32, torch.float64):
                raise errors.ShapeError(f"wkv4: state.{name} must be float32, got {x.dtype}")
            if x.device != device:
                raise errors.ShapeError(f"wkv4: state.{name} is on {x.device}, k/v are on {device}")
