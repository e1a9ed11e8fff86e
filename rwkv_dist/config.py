"""Config files: YAML validated by pydantic into typed objects before any work starts.

Every problem becomes one ConfigError line naming the file and the field, e.g.
    configs/model/x.yaml: model.n_embd: Input should be greater than or equal to 1 (got -3)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .model.config import RWKVConfig, refuse_bools_for_numbers

T = TypeVar("T", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable, numbers are finite (an inf passes
    gt=0 and breaks far from the config: a LR schedule's math error, a sampler's weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    _no_bools = model_validator(mode="before")(classmethod(refuse_bools_for_numbers))  # `steps: true` is not 1


class OptimizerConfig(Section):
    """The paper's recipe: Adam, no weight decay, LR from lr_init to lr_final (warmup, then exponential decay)."""

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
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason})") from None
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
        if err["type"] == "value_error":  # cross-field checks name their own fields, though not always their section
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(msg if field == "(top level)" or msg.startswith(field) else f"{field}.{msg}")
            continue
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {err.get('input')!r})"
        parts.append(f"{field}: {msg}{got}")
    return "; ".join(parts)


def load_model_file(path: str | Path) -> ModelFile:
    """A model file, or a run config (its `model:` section, after `base:`): `rwkv-dist info` takes either."""
    data = read_yaml(path)
    data = read_run_yaml(path) if "base" in data else data
    if set(data) & (set(RunConfig.model_fields) - set(ModelFile.model_fields)):  # a run config: only the shape counts
        data = {"model": data["model"]} if "model" in data else {}
    return validate(ModelFile, data, str(path))


# ---- the run config (rwkv-dist train) ----------------------------------------------------------------------------


class SourceConfig(Section):
    location: str = Field(description="dataset directory / URL prefix / template with {} (see data/README.md)")
    weight: float = Field(default=1.0, gt=0)
    name: str = ""


class DataConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1)
    val: str | None = Field(default=None, description="dataset whose val split gives the validation loss")
    num_workers: int = Field(default=0, ge=0)
    on_error: Literal["skip", "fail"] = "skip"


class TrainOptimizerConfig(OptimizerConfig):
    """The paper's recipe plus the official code's LR multipliers and clipping."""

    time_decay_lr_mult: float = Field(default=2.0, gt=0)
    time_first_lr_mult: float = Field(default=3.0, gt=0)
    grad_clip: float = Field(default=1.0, ge=0, description="max global grad norm; 0 disables clipping")
    schedule: Literal["exponential", "wsd"] = Field(
        default="exponential", description="exponential: the paper's lr_init -> lr_final decay over the steps after "
                                           "warmup; wsd: warmup, constant lr_init, then a decay to lr_final over the "
                                           "last decay_fraction of the steps (rwkv_dist/train/optim.py)")
    decay_fraction: float = Field(default=0.2, ge=0, le=1, description="wsd: share of the steps in the decay phase "
                                                                        "(0: constant after warmup)")
    decay_shape: Literal["linear", "1-sqrt"] = Field(default="1-sqrt", description="wsd: shape of the decay")

    def decay_start(self, steps: int) -> int:
        """wsd: the 0-based step where the decay begins in a run of `steps`: the last round(decay_fraction x steps)
        steps decay (half up). Sweeps branch cooldowns off a constant-LR run at exactly this step."""
        return steps - int(self.decay_fraction * steps + 0.5)


class ScheduleConfig(Section):
    steps: int = Field(ge=1, description="optimizer steps in the run")
    global_batch_size: int = Field(ge=1, description="sequences per optimizer step, over all ranks")
    micro_batch_size: int = Field(ge=1, description="sequences per rank per forward/backward")
    grad_accum: int = Field(default=1, ge=1)
    segment_len: int | None = Field(default=None, ge=1, description="tokens per segment: each window runs as ctx_len / "
                                    "segment_len segments carrying the model state, with the exact gradient and the "
                                    "activation memory of one segment (rwkv_dist/train/segmented.py); default: "
                                    "ctx_len (one segment)")


class ParallelConfig(Section):
    strategy: Literal["zero3", "ddp", "pipeline"] = "zero3"
    pipeline_stages: int = Field(default=1, ge=1, description="pipeline: stages P; data-parallel degree = world / P")
    stage_layers: list[int] | None = Field(default=None, description="pipeline: blocks per stage (default: balanced "
                                                                       "by parameter count)")
    tensor: int = Field(default=1, ge=1, description="zero3 or pipeline: tensor-parallel degree T (megatron-core layers; "
                                                     "a group of T consecutive ranks, inside one node); data-parallel "
                                                     "degree = world / (P T)")
    context: int = Field(default=1, ge=1, description="zero3 or ddp: context-parallel degree C, each window split into "
                                                      "C pieces on C consecutive ranks (rwkv_dist/parallel/context.py); "
                                                      "data-parallel degree = world / C")
    pipeline_schedule: Literal["1f1b", "gpipe"] = "1f1b"
    pipeline_gather: Literal["micro_batch", "step"] = Field(
        default="micro_batch", description="pipeline: all-gather each stage's parameters for every micro-batch (true "
                                           "ZeRO-3, least memory) or once per step, kept whole until the update "
                                           "(fewer all-gathers, the stage's full parameters resident during the step)")
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    persistence_threshold: int = Field(
        default=10_000, ge=0,
        description="zero3: parameters with at most this many elements stay whole on every rank (per-channel vectors; "
                    "every matrix of a D >= 128 model is sharded)")


class CheckpointConfig(Section):
    every_steps: int = Field(default=100, ge=1)
    keep_last: int = Field(default=3, ge=1)
    resume: str = Field(default="auto", description="auto (newest complete checkpoint, if any), none, or a step folder")
    init_from: str | None = Field(
        default=None, description="start from these weights: an exported .pth / .safetensors, or a run or step folder "
                                  "of any strategy and layout; the optimizer, step, LR schedule and data position "
                                  "start fresh. Ignored when the run resumes from a checkpoint of its own")


class LoggingConfig(Section):
    every_steps: int = Field(default=10, ge=1)
    val_every_steps: int = Field(default=0, ge=0, description="0: only at the end")
    val_batches: int = Field(default=20, ge=1)
    peak_flops: float | None = Field(default=None, gt=0, description="per device, for MFU; default: detected")


class GuardConfig(Section):
    max_bad_steps: int = Field(default=3, ge=1, description="consecutive non-finite steps that trigger a rollback")
    max_rollbacks: int = Field(default=3, ge=0, description="rollbacks before the run gives up")
    spike_sigmas: float = Field(default=6.0, gt=0, description="a loss this many standard deviations above the mean "
                                                               "of the last 100 steps is logged as a spike")


class EvalConfig(Section):
    """Downstream tasks (lm-evaluation-harness, the rwkv_dist backend) on the current weights during training, sharded
    over the data-parallel ranks; scores go to TensorBoard (eval/TASK/METRIC) and metrics.jsonl
    ({"step": S, "eval": {"TASK/METRIC": value}}). See rwkv_dist/evaluation/in_training.py."""

    tasks: list[str] = Field(default=[], description="lm-eval task names (rwkv-paper: the paper's suite); empty: none")
    every_steps: int = Field(default=0, ge=0, description="evaluate every this many steps and at the end; 0: only at "
                                                          "the end")
    limit: int | float | None = Field(default=None, description="documents per task: a count >= 1 or a fraction in "
                                                                "(0, 1); default all")
    include_path: list[str] = Field(default=[], description="folder(s) of local task YAMLs (relative paths: to the "
                                                            "working directory, as lm-eval's data_files)")
    num_fewshot: int | None = Field(default=None, ge=0, description="default: each task's own (0 where it sets none)")
    batch_size: int = Field(default=8, ge=1, description="contexts per forward")

    @field_validator("include_path", mode="before")
    @classmethod
    def _one_or_more(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _valid(self) -> "EvalConfig":
        if any(not t.strip() for t in self.tasks):
            raise ValueError(f"eval.tasks: an empty task name in {self.tasks}")
        limit = self.limit
        if limit is not None and not (isinstance(limit, int) and limit >= 1 or isinstance(limit, float) and 0 < limit < 1):
            raise ValueError(f"eval.limit: a count of documents >= 1 or a fraction in (0, 1), got {limit!r}")
        return self


class FaultsConfig(Section):
    """Fault injection, for testing the guards and the checkpoint commit (leave empty in real runs)."""

    nan_loss_at_steps: list[int] = Field(default=[], description="steps (1-based) whose loss is made NaN on rank 0")
    crash_in_save_at_step: int | None = Field(default=None, description="kill the process mid-way through this "
                                                                          "step's checkpoint, before it is committed")


class RunConfig(Section):
    name: str = "run"
    out_dir: str = Field(default="runs/run", min_length=1)  # "" would write the run into the working directory
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 where the device computes it natively (CUDA compute capability >= 8, "
                                    "CPUs with AVX-512 BF16 or AMX), else fp32")
    l2wrap: bool = True
    model: RWKVConfig
    data: DataConfig
    optimizer: TrainOptimizerConfig
    schedule: ScheduleConfig
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    guard: GuardConfig = GuardConfig()
    eval: EvalConfig = EvalConfig()
    faults: FaultsConfig = FaultsConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.optimizer.warmup_steps > self.schedule.steps:
            raise ValueError(f"optimizer.warmup_steps ({self.optimizer.warmup_steps}) exceeds schedule.steps "
                             f"({self.schedule.steps})")
        if self.optimizer.schedule == "wsd":
            start = self.optimizer.decay_start(self.schedule.steps)
            if self.optimizer.warmup_steps > start:
                raise ValueError(f"optimizer.warmup_steps ({self.optimizer.warmup_steps}) runs into the wsd decay, "
                                 f"which starts at step {start} of {self.schedule.steps} (decay_fraction "
                                 f"{self.optimizer.decay_fraction:g})")
        if self.optimizer.lr_final > self.optimizer.lr_init:
            raise ValueError(f"optimizer.lr_final ({self.optimizer.lr_final}) exceeds lr_init ({self.optimizer.lr_init})")
        for flag in ("offload_params", "offload_optimizer"):
            if getattr(self.parallel, flag) and self.parallel.strategy not in ("zero3", "pipeline"):
                raise ValueError(f"parallel.{flag} needs strategy zero3 or pipeline")
        self._check_pipeline()
        self._check_tensor()
        self._check_segments()
        self._check_context()
        if self.schedule.global_batch_size % (self.schedule.micro_batch_size * self.schedule.grad_accum):
            raise ValueError(f"schedule.global_batch_size ({self.schedule.global_batch_size}) is not a multiple of "
                             f"micro_batch_size x grad_accum ({self.schedule.micro_batch_size} x {self.schedule.grad_accum})")
        return self

    def _check_pipeline(self) -> None:
        p, L = self.parallel, self.model.n_layer
        if p.strategy != "pipeline":
            if p.pipeline_stages != 1 or p.stage_layers is not None:
                raise ValueError(f"parallel.pipeline_stages / stage_layers need strategy pipeline (strategy is "
                                 f"{p.strategy})")
            return
        if p.pipeline_stages > L:
            raise ValueError(f"parallel.pipeline_stages ({p.pipeline_stages}) exceeds model.n_layer ({L}): every stage "
                             f"needs a block")
        if p.stage_layers is not None:
            if len(p.stage_layers) != p.pipeline_stages:
                raise ValueError(f"parallel.stage_layers has {len(p.stage_layers)} entries for "
                                 f"{p.pipeline_stages} pipeline stages")
            if any(n < 1 for n in p.stage_layers):
                raise ValueError(f"parallel.stage_layers {p.stage_layers}: every stage needs at least one block")
            if sum(p.stage_layers) != L:
                raise ValueError(f"parallel.stage_layers {p.stage_layers} sums to {sum(p.stage_layers)}, "
                                 f"model.n_layer is {L}")
        if self.schedule.grad_accum < p.pipeline_stages:
            raise ValueError(f"schedule.grad_accum ({self.schedule.grad_accum}) is below parallel.pipeline_stages "
                             f"({p.pipeline_stages}): a pipeline needs at least one micro-batch per stage per step")

    def _check_context(self) -> None:
        C, p = self.parallel.context, self.parallel
        if C == 1:
            return
        if p.strategy not in ("zero3", "ddp") or p.tensor > 1 or self.segmented:
            raise ValueError(f"parallel.context ({C}) needs strategy zero3 or ddp, without tensor parallelism or "
                             f"schedule.segment_len")
        if self.model.ctx_len % C:
            raise ValueError(f"parallel.context ({C}) does not divide model.ctx_len ({self.model.ctx_len})")

    def _check_segments(self) -> None:
        seg, ctx = self.schedule.segment_len, self.model.ctx_len
        if seg is None or seg == ctx:
            return
        if ctx % seg:
            raise ValueError(f"schedule.segment_len ({seg}) does not divide model.ctx_len ({ctx})")
        if self.parallel.strategy not in ("zero3", "ddp") or self.parallel.tensor > 1:
            raise ValueError(f"schedule.segment_len ({seg} < ctx_len {ctx}) needs strategy zero3 or ddp without "
                             f"tensor parallelism")

    @property
    def segmented(self) -> bool:
        """Whether windows train in segments shorter than ctx_len."""
        return self.schedule.segment_len is not None and self.schedule.segment_len < self.model.ctx_len

    def _check_tensor(self) -> None:
        T, m = self.parallel.tensor, self.model
        if T == 1:
            return
        if self.parallel.strategy not in ("zero3", "pipeline"):
            raise ValueError(f"parallel.tensor ({T}) needs strategy zero3 or pipeline (strategy is "
                             f"{self.parallel.strategy})")
        for name, value in (("n_embd", m.n_embd), ("ffn_width", m.ffn_width), ("vocab_size", m.vocab_size)):
            if value % T:
                raise ValueError(f"parallel.tensor ({T}) does not divide model.{name} ({value})")

    @property
    def pipeline_stages(self) -> int:
        return self.parallel.pipeline_stages if self.parallel.strategy == "pipeline" else 1

    def check_world_size(self, world_size: int, source: str = "config") -> None:
        """The world must split into pipeline_stages x data-parallel x tensor-parallel ranks, and micro_batch_size x
        grad_accum x data-parallel ranks must equal global_batch_size (known only once ranks exist)."""
        s, P, T = self.schedule, self.pipeline_stages, self.parallel.tensor * self.parallel.context
        if world_size % (P * T):
            C = self.parallel.context
            what = " x ".join(filter(None, [f"parallel.pipeline_stages ({P})" if P > 1 or T == 1 else "",
                                            f"parallel.tensor ({T // C})" if T // C > 1 else "",
                                            f"parallel.context ({C})" if C > 1 else ""]))
            raise ConfigError(f"{source}: {what} does not divide the world size ({world_size})")
        dp = world_size // (P * T)
        if s.micro_batch_size * s.grad_accum * dp != s.global_batch_size:
            what = "world size" if P * T == 1 else f"data-parallel ranks (world {world_size} / {P * T} model-parallel)"
            raise ConfigError(f"{source}: schedule.micro_batch_size x grad_accum x {what} = {s.micro_batch_size} x "
                              f"{s.grad_accum} x {dp} = {s.micro_batch_size * s.grad_accum * dp}, "
                              f"but global_batch_size is {s.global_batch_size}")


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """`a.b.c=value` pairs (value parsed as YAML) applied to a nested dict; a path through a non-mapping is an error.
    Unknown keys are left for validation to name."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{source}: override {item!r} is not key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            raise ConfigError(f"{source}: override {item!r}: value is not valid YAML") from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section (lists and values replace)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_run_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A run config file; `base: OTHER.yaml` (relative to this file) supplies defaults, e.g. a model file's shape,
    recipe and precision."""
    if Path(path).resolve() in _chain:  # a base that leads back to itself would recurse until Python gives up
        raise ConfigError(f"{_chain[0]}: base: {path} includes itself (a cycle of base: files)")
    _chain = (*_chain, Path(path).resolve())
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    base_path = Path(path).parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: no such file {base_path}")
    return merge(read_run_yaml(base_path, _chain), data)


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    data = apply_overrides(read_run_yaml(path), overrides or [], str(path))
    return validate(RunConfig, data, str(path))
