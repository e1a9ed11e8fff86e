"""Config files: YAML validated by pydantic into typed objects before any work starts.

Every problem becomes one ConfigError line naming the file and the field, e.g.
    configs/model/x.yaml: model.n_embd: Input should be greater than or equal to 1 (got -3)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError
from .model.config import RWKVConfig

T = TypeVar("T", bound=BaseModel)


class OptimizerConfig(BaseModel):
    """The paper's recipe: Adam, no weight decay, LR from lr_init to lr_final (warmup, then exponential decay)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr_init: float = Field(gt=0)
    lr_final: float = Field(gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)


class ModelFile(BaseModel):
    """configs/model/*.yaml: a model shape and the recipe it was trained with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: RWKVConfig
    optimizer: OptimizerConfig | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate(cls: type[T], data: dict, source: str) -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {describe(e)}") from None


def describe(e: ValidationError) -> str:
    """pydantic's errors as one line: `field.path: message (got value)`, joined by '; '."""
    parts = []
    for err in e.errors():
        field = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {err.get('input')!r})"
        parts.append(f"{field}: {msg}{got}")
    return "; ".join(parts)


def load_model_file(path: str | Path) -> ModelFile:
    return validate(ModelFile, read_yaml(path), str(path))
