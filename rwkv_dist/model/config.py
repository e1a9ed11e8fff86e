"""RWKVConfig: the shape of an RWKV-4 model, validated on construction."""

from __future__ import annotations

import typing

from pydantic import BaseModel, ConfigDict, Field, model_validator


def refuse_bools_for_numbers(model: type[BaseModel], data):
    """A model_validator(mode="before") body: YAML reads true/yes/on as a bool, and pydantic's lax mode takes a bool for
    1 or 0 in an int or float field (`steps: true` would train one step). Only fields that are declared bool take one."""
    if isinstance(data, dict):
        for name, field in model.model_fields.items():
            value = data.get(name)
            if isinstance(value, bool) and field.annotation is not bool and bool not in typing.get_args(field.annotation):
                raise ValueError(f"{name}: expected a number, got {str(value).lower()}")
    return data


class RWKVConfig(BaseModel):
    """Shape of an RWKV-4 model. Unknown or invalid fields raise a pydantic ValidationError naming the field."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # an inf eps passes gt=0

    n_layer: int = Field(ge=1, description="number of blocks L")
    n_embd: int = Field(ge=1, description="model width D")
    vocab_size: int = Field(ge=2, description="vocabulary size V (the paper's models use 50277)")
    ctx_len: int = Field(default=1024, ge=1, description="training context length")
    dim_ffn: int | None = Field(default=None, ge=1, description="ChannelMix hidden width; 4 * n_embd when unset")
    layer_norm_eps: float = Field(default=1e-5, gt=0)

    _no_bools = model_validator(mode="before")(classmethod(refuse_bools_for_numbers))

    @property
    def ffn_width(self) -> int:
        return self.dim_ffn if self.dim_ffn is not None else 4 * self.n_embd

    def num_params(self) -> int:
        """Closed form; equals 2VD + 13D^2 L + D(11L + 4) for the paper's 4x ChannelMix."""
        D, L, V = self.n_embd, self.n_layer, self.vocab_size
        return 2 * V * D + L * self._block_matmul_params() + D * (11 * L + 4)

    def flops_per_token_fwd(self) -> int:
        """Forward FLOPs per token: 2 x (matmul weights); the embedding is a lookup, so V*D counts once (the head)."""
        return 2 * (self.vocab_size * self.n_embd + self.n_layer * self._block_matmul_params())

    def _block_matmul_params(self) -> int:
        # TimeMix: key, value, receptance, output (D x D each); ChannelMix: key (F x D), value (D x F), receptance (D x D)
        D, F = self.n_embd, self.ffn_width
        return 4 * D * D + 2 * D * F + D * D
