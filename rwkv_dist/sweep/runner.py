"""`rwkv-dist sweep SWEEP.yaml`: scaling-law sweeps run as Ray tasks.

Design. A sweep gives model sizes and either token budgets (`grid.tokens`, a sizes x tokens grid) or FLOP budgets
(`grid.budgets`, isoFLOP profiles: each run's tokens = budget / the model's own training FLOPs per token, the count
`rwkv-dist info` prints, so budgets, the results table, the fits and the plots share one definition of compute),
optionally times learning rates (`grid.lr`). Every grid point is an ordinary `rwkv-dist train` run (its own out_dir,
checkpoints, TensorBoard), validated as a run config before anything starts.

WSD branches. When the base run uses `optimizer.schedule: wsd`, a run of any length is a constant-LR run up to its
decay start plus a cooldown. So each (size, lr) trains its constant phase once, as the run `NAME-const`, in segments
that end at the budgets' decay starts (each segment is `rwkv-dist train ... schedule.steps=D --resume auto`, so a
segment is exactly resumable like any run); the final checkpoint of each segment is kept (hard links) in
`runs/NAME-const/branch_points/`; the cooldown branch of each budget starts from it with `--resume <that folder>` as
soon as it exists, through the trainer's own exact resume (engine, data position, RNG). Branch rows of results.csv
name their `parent`; `flops_spent` is what a row really computed, `flops` what an independent run would have.

Execution. Each training process runs inside a Ray task that holds its resources through a placement group of one
bundle (the run's workers x CPUs/GPUs, on one node, as `torchrun --standalone` needs), at most `max_concurrent` at a
time. The subprocess-per-run design is kept over Ray Tune: a run is already a self-contained, exactly-resumable
program with its own checkpoints, and a sweep's state is nothing but the run folders, so a killed driver needs no
experiment snapshot: the same command reads the folders again (runs with `sweep_result.json` "done" are skipped,
interrupted ones resume from their newest committed checkpoint, segments whose branch point exists are not rerun).
A failing run is retried up to `max_retries` times (resuming from its checkpoint) and is then recorded as failed with
the last line of its error; runs that need it (branches of a failed constant run) are recorded as failed too, and the
rest go on. The driver prints a live table (run, status, step/total, loss, ETA) and `rwkv-dist sweep-status OUT`
prints the same table from the folders at any time.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from ..config import Section, load_run_config, read_yaml, validate
from ..errors import ConfigError, RWKVDistError
from ..train.checkpoint import COMPLETE, CheckpointStore, step_name, write_atomic
from ..train.observe import read_metrics

RESULT = "sweep_result.json"
PLAN = "plan.json"
DRIVER = "driver.json"
BRANCH_POINTS = "branch_points"
# flops = training FLOPs by the model's own count (3 x the forward's, from its shapes; `rwkv-dist info`), the compute of
# every budget and fit; flops_6nd = the 6 N D convention, for comparison only; flops_spent = what the row computed
# (a branch: its cooldown only; a constant run: its constant phase).
COLUMNS = ["run", "role", "parent", "n_layer", "n_embd", "lr", "budget", "params", "params_non_embedding",
           "flops_per_token", "steps", "start_step", "tokens", "flops", "flops_6nd", "flops_spent", "train_loss",
           "val_loss", "wall_s", "attempts", "status", "error"]


class SweepError(RWKVDistError):
    """Runs of a sweep failed (each keeps its train.log)."""


# ---------------------------------------------------------------------------------------------------------- the spec


class GridModel(Section):
    n_layer: int = Field(ge=1)
    n_embd: int = Field(ge=1)
    overrides: list[str] = Field(default=[], description="run-config overrides for this size only")


class Grid(Section):
    models: list[GridModel] = Field(min_length=1, description="model sizes (the ladder, with grid.sizes_per_budget)")
    tokens: list[int] | None = Field(default=None, min_length=1, description="training tokens per run (a grid)")
    budgets: list[float] | None = Field(default=None, min_length=1,
                                        description="training FLOP budgets (isoFLOP profiles), by the model's count")
    sizes_per_budget: int | None = Field(default=None, ge=3, description="budgets: this many consecutive sizes of "
                                                                         "`models` around each budget's predicted "
                                                                         "optimum instead of every size")
    tokens_per_param: float = Field(default=20.0, gt=0, description="the predicted optimum for sizes_per_budget")
    lr: list[float] | None = Field(default=None, min_length=1, description="lr_init values; lr_final keeps the "
                                                                           "base's ratio")

    @model_validator(mode="after")
    def _one_axis(self) -> "Grid":
        if (self.tokens is None) == (self.budgets is None):
            raise ValueError("grid: give either tokens (a sizes x tokens grid) or budgets (isoFLOP), not both or "
                             "neither")
        if self.sizes_per_budget is not None and self.budgets is None:
            raise ValueError("grid.sizes_per_budget: needs grid.budgets")
        if self.sizes_per_budget is not None and self.sizes_per_budget > len(self.models):
            raise ValueError(f"grid.sizes_per_budget ({self.sizes_per_budget}) exceeds the {len(self.models)} sizes "
                             f"in grid.models")
        for key in ("tokens", "budgets", "lr"):
            if any(not v > 0 for v in getattr(self, key) or []):
                raise ValueError(f"grid.{key}: every value must be positive, got {getattr(self, key)}")
        return self


class Resources(Section):
    workers_per_run: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)


class SweepEval(Section):
    tasks: list[str] = Field(min_length=1, description="lm-eval tasks (or rwkv-paper) scored on each final checkpoint")
    include_path: list[str] = Field(default=[], description="folders of local task YAMLs (relative to the sweep file)")
    limit: float | None = Field(default=None, gt=0, description="documents per task (a fraction if < 1)")
    num_fewshot: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=8, ge=1)


class SweepConfig(Section):
    name: str
    base: str = Field(description="run config every grid point starts from (path relative to the sweep file)")
    out_dir: str
    overrides: list[str] = []
    grid: Grid
    resources: Resources = Resources()
    max_concurrent: int = Field(default=1, ge=1)
    max_retries: int = Field(default=1, ge=0, description="times a failing run is restarted (from its checkpoint) "
                                                          "before it is recorded as failed")
    wsd_branches: bool = Field(default=True, description="with optimizer.schedule wsd: one constant-LR run per size "
                                                         "and a cooldown branch per budget, instead of independent "
                                                         "runs")
    eval: SweepEval | None = None


class Run(BaseModel):
    name: str
    n_layer: int
    n_embd: int
    lr: float
    tokens: int
    overrides: list[str]
    out_dir: Path
    role: Literal["run", "constant", "branch"] = "run"
    parent: str | None = None  # branch: the constant run it starts from
    budget: float | None = None  # isoFLOP: the nominal FLOP budget
    steps: int = 0
    start_step: int = 0  # branch: the constant run's step it starts from
    segments: list[int] = []  # constant: the steps where branches start, ascending
    params: int = 0
    params_non_embedding: int = 0
    flops_per_token: int = 0  # training FLOPs per token, 3 x forward
    tokens_per_step: int = 0

    def point(self, step: int) -> Path:
        """constant: the kept checkpoint a branch starting at `step` resumes from."""
        return self.out_dir / BRANCH_POINTS / step_name(step)


# ---------------------------------------------------------------------------------------------------------- planning


def _tag(value: float) -> str:
    """1.5e+09 -> 1.5e9: folder-friendly budget names."""
    return f"{value:.3g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def load_sweep(path: str | Path) -> tuple[SweepConfig, Path, list[Run]]:
    """The sweep, its base run config's path, and every run it needs (grid points, constant runs), each checked as a
    run config: every problem is one ConfigError line naming the sweep file, before anything starts."""
    path = Path(path)
    sweep = validate(SweepConfig, read_yaml(path), str(path))
    base = path.parent / sweep.base
    if not base.is_file():
        raise ConfigError(f"{path}: base: no such run config {base}")
    base_cfg = load_run_config(base, sweep.overrides)
    grid = sweep.grid
    ratio = base_cfg.optimizer.lr_final / base_cfg.optimizer.lr_init
    lrs = grid.lr or [base_cfg.optimizer.lr_init]
    branching = base_cfg.optimizer.schedule == "wsd" and sweep.wsd_branches
    runs: list[Run] = []

    sizes = []  # (index, model, checked config of the size, its name)
    for i, m in enumerate(grid.models):
        label = f"L{m.n_layer}-D{m.n_embd}"
        size_over = [*sweep.overrides, *m.overrides, f"model.n_layer={m.n_layer}", f"model.n_embd={m.n_embd}"]
        sizes.append((i, m, _check(path, f"grid.models.{i} ({label})", base, size_over, sweep), label, size_over))

    # The points of each size: (steps, budget or None).
    points: dict[int, list[tuple[int, float | None]]] = {i: [] for i, *_ in sizes}
    for i, m, cfg, label, _ in sizes:
        tps = cfg.schedule.global_batch_size * cfg.model.ctx_len
        if grid.tokens is not None:
            points[i] = [(math.ceil(t / tps), None) for t in grid.tokens]
    if grid.budgets is not None:
        for j, budget in enumerate(grid.budgets):
            for i in _ladder(grid, sizes, budget):
                _, m, cfg, label, _ = sizes[i]
                tps = cfg.schedule.global_batch_size * cfg.model.ctx_len
                per_step = 3 * cfg.model.flops_per_token_fwd() * tps
                if budget < per_step:
                    raise ConfigError(f"{path}: grid.budgets.{j}: {budget:.3g} FLOPs is less than one step of {label} "
                                      f"({per_step:.3g} FLOPs for {tps} tokens)")
                points[i].append((round(budget / per_step), budget))

    for i, m, cfg, label, size_over in sizes:
        tps = cfg.schedule.global_batch_size * cfg.model.ctx_len
        facts = dict(n_layer=m.n_layer, n_embd=m.n_embd, params=cfg.model.num_params(),
                     params_non_embedding=cfg.model.num_params() - 2 * cfg.model.vocab_size * cfg.model.n_embd,
                     flops_per_token=3 * cfg.model.flops_per_token_fwd(), tokens_per_step=tps)
        for lr in lrs:
            lr_over = [f"optimizer.lr_init={lr}", f"optimizer.lr_final={lr * ratio}"]
            lr_tag = f"-lr{lr:g}" if grid.lr else ""
            family = points[i]
            if branching and len(family) > 1:
                runs += _branches(path, base, sweep, cfg, label, lr_tag, size_over + lr_over, family, lr, facts)
                continue
            for steps, budget in family:
                name = (f"{label}-C{_tag(budget)}" if budget else f"{label}-T{_tokens_tag(grid, steps, tps)}") + lr_tag
                over = [*size_over, *lr_over, f"schedule.steps={steps}",
                        f"optimizer.warmup_steps={min(base_cfg.optimizer.warmup_steps, steps // 10)}"]
                runs.append(_run(path, base, sweep, name, over, lr=lr, budget=budget, steps=steps, **facts))
    if len({r.name for r in runs}) != len(runs):
        raise ConfigError(f"{path}: grid has repeated points")
    _check_data(path, base, runs)
    return sweep, base, runs


def _check_data(path: Path, base: Path, runs: list[Run]) -> None:
    """The trainer's input checks (datasets, manifests, vocabulary, out_dir) once per distinct data setting: a wrong
    path is one line now, not a failure of every run later."""
    from ..train.trainer import check_inputs

    seen = set()
    for run in runs:
        cfg = load_run_config(base, run.overrides)
        key = (cfg.data.model_dump_json(), cfg.model.vocab_size)
        if key not in seen:
            seen.add(key)
            try:
                check_inputs(cfg.model_copy(update={"out_dir": str(run.out_dir)}), run.name)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None


def _tokens_tag(grid: Grid, steps: int, tps: int) -> int:
    """The grid.tokens value a grid point came from (names keep the requested count, the run trains whole steps)."""
    return next(t for t in grid.tokens if math.ceil(t / tps) == steps)


def _ladder(grid: Grid, sizes: list, budget: float) -> list[int]:
    """The sizes a budget runs: all, or sizes_per_budget consecutive ones (by parameters) centred on the size whose
    tokens per parameter at this budget is closest to grid.tokens_per_param (the predicted optimum)."""
    if grid.sizes_per_budget is None:
        return [i for i, *_ in sizes]
    order = sorted(range(len(sizes)), key=lambda i: sizes[i][2].model.num_params())

    def distance(i: int) -> float:
        cfg = sizes[i][2]
        tokens = budget / (3 * cfg.model.flops_per_token_fwd())
        return abs(math.log(tokens / cfg.model.num_params() / grid.tokens_per_param))

    centre = min(range(len(order)), key=lambda k: distance(order[k]))
    k = grid.sizes_per_budget
    first = min(max(centre - (k - 1) // 2, 0), len(order) - k)
    return sorted(order[first:first + k])


def _branches(path: Path, base: Path, sweep: SweepConfig, cfg, label: str, lr_tag: str, over: list[str],
              family: list[tuple[int, float | None]], lr: float, facts: dict) -> list[Run]:
    """One constant-LR run and a WSD cooldown branch per point of a (size, lr)."""
    grid = sweep.grid
    tps = facts["tokens_per_step"]
    # The warmup is shared by the constant run and every branch: it is part of their common trajectory.
    warmup = min(cfg.optimizer.warmup_steps, min(s for s, _ in family) // 10)
    const_name = f"{label}-const{lr_tag}"
    runs, starts = [], []
    for steps, budget in family:
        name = (f"{label}-C{_tag(budget)}" if budget else f"{label}-T{_tokens_tag(grid, steps, tps)}") + lr_tag
        start = cfg.optimizer.decay_start(steps)
        if start < max(warmup, 1):
            raise ConfigError(f"{path}: {name}: the wsd decay starts at step {start} of {steps}, before the end of "
                              f"warmup ({warmup} steps): no constant phase to branch from (fewer steps in the decay, "
                              f"or a larger budget)")
        over_b = [*over, f"schedule.steps={steps}", f"optimizer.warmup_steps={warmup}"]
        runs.append(_run(path, base, sweep, name, over_b, role="branch", parent=const_name, lr=lr, budget=budget,
                         steps=steps, start_step=start, **facts))
        starts.append(start)
    segments = sorted(set(starts))
    over_c = [*over, f"schedule.steps={segments[-1]}", f"optimizer.warmup_steps={warmup}", "optimizer.decay_fraction=0"]
    const = _run(path, base, sweep, const_name, over_c, role="constant", lr=lr, steps=segments[-1], segments=segments,
                 **facts)
    for s in segments[:-1]:  # every segment is a valid run of its own length too
        _check(path, const_name, base, [*over_c[:-3], f"schedule.steps={s}", *over_c[-2:]], sweep)
    return [const, *runs]


def _run(path: Path, base: Path, sweep: SweepConfig, name: str, over: list[str], **fields) -> Run:
    out = Path(sweep.out_dir) / "runs" / name
    overrides = [*over, f"name={name}", f"out_dir={out}"]
    _check(path, name, base, overrides, sweep)
    tokens = fields["steps"] * fields["tokens_per_step"]
    return Run(name=name, tokens=tokens, overrides=overrides, out_dir=out, **fields)


def _check(path: Path, name: str, base: Path, overrides: list[str], sweep: SweepConfig):
    """The run config of one point, or one ConfigError line naming the sweep file and the point."""
    try:
        cfg = load_run_config(base, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {name}: {e}") from None
    cfg.check_world_size(sweep.resources.workers_per_run, f"{path}: {name}")
    return cfg


# ---------------------------------------------------------------------------------------------------------- one run


def _train_command(base: Path, run: Run, workers: int, steps: int | None = None, resume: str = "auto") -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(workers)]
                if workers > 1 else [sys.executable])
    overrides = run.overrides if steps is None else [*run.overrides, f"schedule.steps={steps}"]
    return [*launcher, "-m", "rwkv_dist.cli", "train", str(base.resolve()), *overrides, "--resume", resume]


def _eval_command(sweep: SweepConfig, sweep_dir: Path, run: Run) -> list[str] | None:
    e = sweep.eval
    if e is None or run.role == "constant":
        return None
    cmd = [sys.executable, "-m", "rwkv_dist.cli", "lm-eval", str(run.out_dir), "--tasks", ",".join(e.tasks),
           "--batch-size", str(e.batch_size), "--output-path", str(run.out_dir / "eval")]
    for folder in e.include_path:
        cmd += ["--include-path", str((sweep_dir / folder).resolve())]
    cmd += ["--limit", f"{e.limit:g}"] if e.limit is not None else []
    cmd += ["--num-fewshot", str(e.num_fewshot)] if e.num_fewshot is not None else []
    return cmd


def _die_with_parent(sig: int) -> None:
    """In the child before exec: the kernel sends `sig` when the Ray worker that started it dies (a killed driver
    takes its workers down), so no orphaned trainer goes on writing into a run folder the next driver resumes."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG


def _execute(cmd: list[str], cwd: str, log: str, eval_cmd: list[str] | None = None,
             keep: tuple[str, int, str] | None = None) -> tuple[int, float]:
    """Runs inside a Ray task: one training process, output appended to its log file; then, if it finished, the
    evaluation of its final checkpoint (eval.log beside it), or for a constant-run segment `keep` = (run folder,
    step, destination): that step's committed checkpoint kept as a branch point. Returns (exit code, seconds)."""
    start = time.time()
    # torchrun is told with SIGTERM, which it forwards to its workers; a lone trainer is killed outright
    sig = signal.SIGTERM if "torch.distributed.run" in cmd else signal.SIGKILL
    preexec = (lambda: _die_with_parent(sig)) if sys.platform == "linux" else None
    with open(log, "a") as f:
        f.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd[1:])}\n")
        f.flush()
        code = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=preexec).returncode
        if code == 0 and keep is not None:
            try:
                keep_checkpoint(Path(keep[0]), keep[1], Path(keep[2]))
            except (OSError, RWKVDistError) as e:
                f.write(f"sweep: error: keeping the branch point failed: {e}\n")
                code = 1
    wall = time.time() - start
    if code == 0 and eval_cmd:
        with open(Path(log).with_name("eval.log"), "a") as f:
            code = subprocess.run(eval_cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=preexec).returncode
    return code, wall


def keep_checkpoint(run_dir: Path, step: int, dest: Path) -> Path:
    """Hard-link copy (a real copy across file systems) of run_dir's committed checkpoint of `step` at `dest`,
    atomically: the run's keep_last pruning cannot take a branch point away, and it costs no disk."""
    src = run_dir / "checkpoints" / step_name(step)
    if not (src / COMPLETE).is_file():
        raise SweepError(f"{src}: no committed checkpoint of step {step}")
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, partial, copy_function=link)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(partial, dest)
    return dest


def eval_columns(out_dir: Path) -> dict[str, float]:
    """{"TASK/METRIC": value} from the newest lm-eval results file under out_dir/eval (stderr columns left out)."""
    files = sorted((out_dir / "eval").rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    results = json.loads(files[-1].read_text()).get("results", {})
    return {f"{task}/{key.split(',')[0]}": value for task, scores in results.items() for key, value in scores.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float))}


def last_error(log: Path) -> str:
    """The line of a run's log that says why it failed: its last `error:` line, else its last line."""
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    errors = [x for x in lines if "error:" in x.lower() or "Error" in x]
    return (errors or lines or [""])[-1][:400]


def _row(run: Run) -> dict:
    spent_steps = run.steps - run.start_step
    return {"run": run.name, "role": run.role, "parent": run.parent or "", "n_layer": run.n_layer,
            "n_embd": run.n_embd, "lr": run.lr, "budget": run.budget if run.budget is not None else "",
            "params": run.params, "params_non_embedding": run.params_non_embedding,
            "flops_per_token": run.flops_per_token, "steps": run.steps, "start_step": run.start_step,
            "tokens": run.tokens, "flops": run.flops_per_token * run.tokens, "flops_6nd": 6 * run.params * run.tokens,
            "flops_spent": run.flops_per_token * run.tokens_per_step * spent_steps}


def _summarize(base: Path, run: Run, code: int, wall: float, evaluated: bool = False, attempts: int = 1,
               error: str = "") -> dict:
    if not run.params:  # a Run built by hand: its size facts from its config
        cfg = load_run_config(base, run.overrides)
        tps = cfg.schedule.global_batch_size * cfg.model.ctx_len
        run = run.model_copy(update=dict(
            params=cfg.model.num_params(), flops_per_token=3 * cfg.model.flops_per_token_fwd(), tokens_per_step=tps,
            params_non_embedding=cfg.model.num_params() - 2 * cfg.model.vocab_size * cfg.model.n_embd,
            steps=run.steps or cfg.schedule.steps))
    row = {**_row(run), "train_loss": "", "val_loss": "", "wall_s": round(wall, 2), "attempts": attempts,
           "status": "failed", "error": error}
    metrics = run.out_dir / "metrics.jsonl"
    scores = eval_columns(run.out_dir) if evaluated else {}
    if code == 0 and metrics.is_file() and (scores or not evaluated):
        records = read_metrics(metrics)
        losses = [r["loss"] for r in records if r.get("applied")]
        vals = [r["val_loss"] for r in records if "val_loss" in r]
        tail = losses[-max(len(losses) // 10, 1):]  # the last 10% of steps: less noisy than the final batch
        row.update(train_loss=sum(tail) / len(tail) if tail else "", val_loss=vals[-1] if vals else "",
                   status="done" if tail or vals else "failed", error="" if tail or vals else "no step was applied",
                   **scores)
    elif code == 0 and not error:
        row["error"] = "no metrics or evaluation results were written"
    return row


def _result(run: Run) -> dict | None:
    path = run.out_dir / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def is_done(run: Run) -> bool:
    return (_result(run) or {}).get("status") == "done"


def write_table(out_dir: Path, runs: list[Run]) -> Path:
    rows = []
    for run in runs:
        rows.append(_result(run) or {**{c: "" for c in COLUMNS}, **_row(run), "status": "pending"})
    path = out_dir / "results.csv"
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    extra = sorted({k for row in rows for k in row} - set(COLUMNS))  # eval columns TASK/METRIC
    writer = csv.DictWriter(buf, fieldnames=COLUMNS + extra, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------------------------- the driver


class _Job(BaseModel):
    run: Run
    segment: int | None = None  # constant: the segment's last step


def _next_job(run: Run, runs: dict[str, Run], failed: set[str]) -> _Job | None:
    """What `run` can start now, if anything."""
    if run.name in failed or is_done(run):
        return None
    if run.role == "constant":
        todo = [s for s in run.segments if not (run.point(s) / COMPLETE).is_file()]
        return _Job(run=run, segment=todo[0]) if todo else None
    if run.role == "branch":
        parent = runs[run.parent]
        if parent.name in failed or not (parent.point(run.start_step) / COMPLETE).is_file():
            return None
    return _Job(run=run)


def _command(base: Path, job: _Job, workers: int) -> list[str]:
    run = job.run
    if run.role == "branch" and not CheckpointStore(run.out_dir / "checkpoints").committed():
        # not started yet (or killed before its first checkpoint): from the constant run's branch point
        return _train_command(base, run, workers, resume=str(job_parent_point(run).resolve()))
    return _train_command(base, run, workers, steps=job.segment)


def job_parent_point(run: Run) -> Path:
    return Path(run.out_dir).parent / run.parent / BRANCH_POINTS / step_name(run.start_step)


def _stale_trainers(run: Run) -> list[int]:
    """Trainer processes of an earlier driver still alive in this run folder (this host): never start a second."""
    import psutil

    pids = []
    for f in (run.out_dir / "workers").glob("rank_*.json"):
        try:
            pid = json.loads(f.read_text())["pid"]
            if psutil.pid_exists(pid) and str(run.out_dir) in " ".join(psutil.Process(pid).cmdline()):
                pids.append(pid)
        except (OSError, ValueError, KeyError, psutil.Error):
            continue
    return pids


def _wait_for_stale(run: Run, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while (pids := _stale_trainers(run)) and time.time() < deadline:
        time.sleep(0.5)
    if pids:
        raise SweepError(f"{run.out_dir}: trainer process(es) {pids} of an earlier sweep driver are still running")


def _lock(out_dir: Path):
    """One driver per sweep folder: an exclusive lock the kernel releases when the driver dies, however it dies."""
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    f = open(out_dir / ".driver.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise SweepError(f"{out_dir}: another sweep driver is running on this folder (see {out_dir / DRIVER})") \
            from None
    return f


def run_sweep(path: str | Path, address: str = "local", dry_run: bool = False, echo=print,
              status_every: float = 30.0) -> Path:
    sweep, base, runs = load_sweep(path)
    res = sweep.resources
    out = Path(sweep.out_dir)
    by_name = {r.name: r for r in runs}
    todo = [r for r in runs if not is_done(r)]
    data_runs = [r for r in runs if r.role != "constant"]
    echo(f"sweep {sweep.name}: {len(runs)} runs ({len(runs) - len(todo)} finished before, {len(todo)} to run), "
         f"{res.workers_per_run} worker(s) x (CPU {res.cpus_per_worker:g}, GPU {res.gpus_per_worker:g}) each, "
         f"at most {sweep.max_concurrent} at a time")
    if any(r.role == "constant" for r in runs):
        independent = sum(r.flops_per_token * r.tokens for r in data_runs)
        spent = sum(_row(r)["flops_spent"] for r in runs)
        echo(f"  wsd branches: {sum(r.role == 'constant' for r in runs)} constant-LR runs, "
             f"{sum(r.role == 'branch' for r in runs)} cooldown branches; {spent:.3g} training FLOPs instead of "
             f"{independent:.3g} for independent runs ({1 - spent / independent:.0%} saved)")
    for run in todo if dry_run else []:
        if run.role == "constant":
            for s in run.segments:
                echo(f"  {run.name} (constant LR, to step {s}): "
                     f"{' '.join(_train_command(base, run, res.workers_per_run, steps=s)[1:])}")
        elif run.role == "branch":
            echo(f"  {run.name} (cooldown of {run.parent} from step {run.start_step}): "
                 f"{' '.join(_train_command(base, run, res.workers_per_run, resume=str(job_parent_point(run)))[1:])}")
        else:
            echo(f"  {run.name}: {' '.join(_train_command(base, run, res.workers_per_run)[1:])}")
        if sweep.eval and run.role != "constant":
            echo(f"    then: {' '.join(_eval_command(sweep, Path(path).parent, run)[1:])}")
    if dry_run:
        return out / "results.csv"
    lock = _lock(out)
    write_atomic(out / PLAN, json.dumps({"name": sweep.name, "runs": [json.loads(r.model_dump_json()) for r in runs]},
                                        indent=1) + "\n")
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from .status import render_status

    started_here = address == "local"
    cpus, gpus = res.workers_per_run * res.cpus_per_worker, res.workers_per_run * res.gpus_per_worker
    if started_here:
        ray.init(num_cpus=max(int(math.ceil(cpus * sweep.max_concurrent)), 1), include_dashboard=False,
                 log_to_driver=False)
    else:
        ray.init(address=address)
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    task = ray.remote(max_retries=0)(_execute)  # retries are ours: they resume from the run's checkpoint
    attempts: dict[str, int] = {}
    failed: set[str] = set()
    running: dict = {}  # ObjectRef -> (job, placement group)
    last_status = time.time()

    def heartbeat() -> None:
        write_atomic(out / DRIVER, json.dumps({"pid": os.getpid(), "time": time.time(),
                                               "running": [j.run.name for j, _ in running.values()]}) + "\n")

    def fail(run: Run, row: dict) -> None:
        """Record a failed run; the runs that needed it fail with it."""
        failed.add(run.name)
        write_atomic(run.out_dir / RESULT, json.dumps(row) + "\n")
        for child in runs:
            if child.parent == run.name and child.name not in failed and not is_done(child):
                child.out_dir.mkdir(parents=True, exist_ok=True)
                fail(child, {**_row(child), "train_loss": "", "val_loss": "", "wall_s": 0, "attempts": 0,
                             "status": "failed", "error": f"parent {run.name} failed"})

    try:
        while True:
            # Constant segments first: each one finished lets branches start.
            order = sorted(runs, key=lambda r: {"constant": 0, "branch": 1, "run": 2}[r.role])
            busy = {j.run.name for j, _ in running.values()}
            for run in order:
                if len(running) >= sweep.max_concurrent:
                    break
                job = None if run.name in busy else _next_job(run, by_name, failed)
                if job is None:
                    continue
                run.out_dir.mkdir(parents=True, exist_ok=True)
                _wait_for_stale(run)
                pg = placement_group([bundle], strategy="STRICT_PACK")
                keep = (str(run.out_dir), job.segment, str(run.point(job.segment))) if job.segment else None
                ref = task.options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=0)).remote(
                    _command(base, job, res.workers_per_run), os.getcwd(), str((run.out_dir / "train.log").resolve()),
                    None if job.segment else _eval_command(sweep, Path(path).parent, run), keep)
                running[ref] = (job, pg)
                busy.add(run.name)
                what = f" (constant LR to step {job.segment})" if job.segment else (
                    f" (cooldown from {run.parent} step {run.start_step})" if run.role == "branch" else "")
                echo(f"  {run.name}: started{what}")
            heartbeat()
            if not running:
                break
            timeout = max(status_every - (time.time() - last_status), 0.1) if status_every else None
            ready, _ = ray.wait(list(running), num_returns=1, timeout=timeout)
            if status_every and time.time() - last_status >= status_every:
                echo(render_status(out))
                last_status = time.time()
            if not ready:
                continue
            job, pg = running.pop(ready[0])
            remove_placement_group(pg)
            run = job.run
            code, wall = ray.get(ready[0])
            attempts[run.name] = attempts.get(run.name, 0) + 1
            log = run.out_dir / "train.log"
            if code == 0 and job.segment is not None:
                seconds = _add_wall(run, wall)
                if job.segment != run.segments[-1]:
                    echo(f"  {run.name}: branch point at step {job.segment} kept in {wall:.0f} s")
                    attempts[run.name] = 0
                    continue
                row = _summarize(base, run, 0, seconds, attempts=attempts[run.name])
            else:
                error = "" if code == 0 else _failure_line(run) or f"exit {code}"
                row = _summarize(base, run, code, wall, evaluated=sweep.eval is not None and run.role != "constant",
                                 attempts=attempts[run.name], error=error)
            if row["status"] == "done":
                write_atomic(run.out_dir / RESULT, json.dumps(row) + "\n")
                echo(f"  {run.name}: done in {row['wall_s']:.0f} s (train {row['train_loss']:.4f})")
            elif attempts[run.name] <= sweep.max_retries:
                echo(f"  {run.name}: exit {code} ({row['error']}); retrying from its newest checkpoint "
                     f"(attempt {attempts[run.name] + 1} of {sweep.max_retries + 1})")
            else:
                fail(run, row)
                echo(f"  {run.name}: failed after {attempts[run.name]} attempt(s): {row['error']} (see {log})")
            write_table(out, runs)
        table = write_table(out, runs)
        echo(render_status(out))
        failed_runs = [r.name for r in runs if (_result(r) or {}).get("status") == "failed"]
        if failed_runs:
            raise SweepError(f"sweep {sweep.name}: {len(failed_runs)} run(s) failed ({', '.join(failed_runs)}); "
                             f"the others are in {table}; run the sweep again to retry them")
        return table
    finally:
        for ref, (_, pg) in running.items():
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
        (out / DRIVER).unlink(missing_ok=True)
        lock.close()


def _failure_line(run: Run) -> str:
    """The error line of whichever of the run's logs (training, evaluation) was written last."""
    logs = [p for p in (run.out_dir / "train.log", run.out_dir / "eval.log") if p.is_file()]
    return last_error(max(logs, key=lambda p: p.stat().st_mtime)) if logs else ""


def _add_wall(run: Run, wall: float) -> float:
    """A constant run's wall time summed over its segments (kept beside it: segments may span drivers)."""
    path = run.out_dir / "segments_wall.json"
    walls = json.loads(path.read_text()) if path.is_file() else {}
    walls[str(len(walls))] = wall
    write_atomic(path, json.dumps(walls) + "\n")
    return sum(walls.values())
