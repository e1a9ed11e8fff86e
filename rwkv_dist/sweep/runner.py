"""`rwkv-dist sweep SWEEP.yaml`: a grid of model sizes x token budgets (x learning rates) run as Ray tasks.

Each grid point is an ordinary `rwkv-dist train` run (its own out_dir, checkpoints, TensorBoard) started as a
subprocess inside a Ray task that holds the run's resources (workers x CPUs/GPUs), at most `max_concurrent` at a time.
A finished run leaves `sweep_result.json` in its folder; restarting the sweep skips those and resumes the others from
their newest committed checkpoints. After every run the table `OUT/results.csv` is rewritten from the result files
(params, tokens, FLOPs, final train/val loss, wall time, status), the input of `rwkv-dist sweep-fit`. With an `eval:`
section, each finished run's final checkpoint is also scored on lm-eval tasks (`rwkv-dist lm-eval`, in the same Ray
task, after training; lm-eval's results in OUT/runs/NAME/eval/) and every task metric becomes a column `TASK/METRIC`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel, Field

from ..config import Section, load_run_config, read_yaml, validate
from ..errors import ConfigError, RWKVDistError
from ..train.checkpoint import write_atomic
from ..train.observe import read_metrics

RESULT = "sweep_result.json"
# flops = 6 N D, the convention of the fit's compute budget C (sweep-fit); model_flops = the FLOPs the model really
# runs (3 x the forward's, from its shapes; no FLOPs for the embedding lookup)
COLUMNS = ["run", "n_layer", "n_embd", "lr", "params", "tokens", "flops", "model_flops", "train_loss", "val_loss",
           "wall_s", "status"]


class SweepError(RWKVDistError):
    """Runs of a sweep failed (each keeps its train.log)."""


class GridModel(Section):
    n_layer: int = Field(ge=1)
    n_embd: int = Field(ge=1)


class Grid(Section):
    models: list[GridModel] = Field(min_length=1)
    tokens: list[int] = Field(min_length=1, description="training tokens per run")
    lr: list[float] | None = Field(default=None, description="lr_init values; lr_final keeps the base's ratio")


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
    eval: SweepEval | None = None


class Run(BaseModel):
    name: str
    n_layer: int
    n_embd: int
    lr: float
    tokens: int
    overrides: list[str]
    out_dir: Path


def load_sweep(path: str | Path) -> tuple[SweepConfig, Path, list[Run]]:
    """The sweep, its base run config's path, and every grid point checked as a run config (one clear error each)."""
    path = Path(path)
    sweep = validate(SweepConfig, read_yaml(path), str(path))
    base = path.parent / sweep.base
    if not base.is_file():
        raise ConfigError(f"{path}: base: no such run config {base}")
    if any(t < 1 for t in sweep.grid.tokens) or any(lr <= 0 for lr in sweep.grid.lr or []):
        raise ConfigError(f"{path}: grid.tokens and grid.lr must be positive")
    base_cfg = load_run_config(base, sweep.overrides)
    s = base_cfg.schedule
    tokens_per_step = s.global_batch_size * base_cfg.model.ctx_len
    ratio = base_cfg.optimizer.lr_final / base_cfg.optimizer.lr_init
    runs = []
    for m in sweep.grid.models:
        for tokens in sweep.grid.tokens:
            for lr in sweep.grid.lr or [base_cfg.optimizer.lr_init]:
                steps = math.ceil(tokens / tokens_per_step)
                name = f"L{m.n_layer}-D{m.n_embd}-T{tokens}" + (f"-lr{lr:g}" if sweep.grid.lr else "")
                out = Path(sweep.out_dir) / "runs" / name
                overrides = [*sweep.overrides, f"name={name}", f"out_dir={out}", f"model.n_layer={m.n_layer}",
                             f"model.n_embd={m.n_embd}", f"schedule.steps={steps}", f"optimizer.lr_init={lr}",
                             f"optimizer.lr_final={lr * ratio}",
                             f"optimizer.warmup_steps={min(base_cfg.optimizer.warmup_steps, steps // 10)}"]
                cfg = load_run_config(base, overrides)  # every point is a valid run before anything starts
                cfg.check_world_size(sweep.resources.workers_per_run, f"{path} ({name})")
                runs.append(Run(name=name, n_layer=m.n_layer, n_embd=m.n_embd, lr=lr, tokens=steps * tokens_per_step,
                                overrides=overrides, out_dir=out))
    if len({r.name for r in runs}) != len(runs):
        raise ConfigError(f"{path}: grid has repeated points")
    return sweep, base, runs


def _train_command(base: Path, run: Run, workers: int) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(workers)]
                if workers > 1 else [sys.executable])
    return [*launcher, "-m", "rwkv_dist.cli", "train", str(base.resolve()), *run.overrides, "--resume", "auto"]


def _eval_command(sweep: SweepConfig, sweep_dir: Path, run: Run) -> list[str] | None:
    e = sweep.eval
    if e is None:
        return None
    cmd = [sys.executable, "-m", "rwkv_dist.cli", "lm-eval", str(run.out_dir), "--tasks", ",".join(e.tasks),
           "--batch-size", str(e.batch_size), "--output-path", str(run.out_dir / "eval")]
    for folder in e.include_path:
        cmd += ["--include-path", str((sweep_dir / folder).resolve())]
    cmd += ["--limit", f"{e.limit:g}"] if e.limit is not None else []
    cmd += ["--num-fewshot", str(e.num_fewshot)] if e.num_fewshot is not None else []
    return cmd


def _execute(cmd: list[str], cwd: str, log: str, eval_cmd: list[str] | None = None) -> tuple[int, float]:
    """Runs inside a Ray task: one training run as a subprocess, output to its log file; then, if it finished, the
    evaluation of its final checkpoint (output to eval.log beside it). Returns (exit code, training seconds)."""
    start = time.time()
    with open(log, "a") as f:
        code = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.time() - start
    if code == 0 and eval_cmd:
        with open(Path(log).with_name("eval.log"), "a") as f:
            code = subprocess.run(eval_cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
    return code, wall


def eval_columns(out_dir: Path) -> dict[str, float]:
    """{"TASK/METRIC": value} from the newest lm-eval results file under out_dir/eval (stderr columns left out)."""
    files = sorted((out_dir / "eval").rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    results = json.loads(files[-1].read_text()).get("results", {})
    return {f"{task}/{key.split(',')[0]}": value for task, scores in results.items() for key, value in scores.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float))}


def _summarize(base: Path, run: Run, code: int, wall: float, evaluated: bool = False) -> dict:
    cfg = load_run_config(base, run.overrides)
    row = {"run": run.name, "n_layer": run.n_layer, "n_embd": run.n_embd, "lr": run.lr,
           "params": cfg.model.num_params(), "tokens": run.tokens,
           "flops": 6 * cfg.model.num_params() * run.tokens,
           "model_flops": 3 * cfg.model.flops_per_token_fwd() * run.tokens, "train_loss": "", "val_loss": "",
           "wall_s": round(wall, 2), "status": "failed"}
    metrics = run.out_dir / "metrics.jsonl"
    scores = eval_columns(run.out_dir) if evaluated else {}
    if code == 0 and metrics.is_file() and (scores or not evaluated):
        records = read_metrics(metrics)
        losses = [r["loss"] for r in records if r.get("applied")]
        vals = [r["val_loss"] for r in records if "val_loss" in r]
        tail = losses[-max(len(losses) // 10, 1):]  # the last 10% of steps: less noisy than the final batch
        row.update(train_loss=sum(tail) / len(tail), val_loss=vals[-1] if vals else "", status="done", **scores)
    return row


def write_table(out_dir: Path, runs: list[Run]) -> Path:
    rows = []
    for run in runs:
        result = run.out_dir / RESULT
        rows.append(json.loads(result.read_text()) if result.is_file() else
                    {**{c: "" for c in COLUMNS}, "run": run.name, "status": "pending"})
    path = out_dir / "results.csv"
    out_dir.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.StringIO()
    extra = sorted({k for row in rows for k in row} - set(COLUMNS))  # eval columns TASK/METRIC
    writer = csv.DictWriter(buf, fieldnames=COLUMNS + extra, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())
    return path


def run_sweep(path: str | Path, address: str = "local", dry_run: bool = False, echo=print) -> Path:
    sweep, base, runs = load_sweep(path)
    res = sweep.resources
    todo = [r for r in runs if not (r.out_dir / RESULT).is_file() or
            json.loads((r.out_dir / RESULT).read_text()).get("status") != "done"]
    echo(f"sweep {sweep.name}: {len(runs)} runs ({len(runs) - len(todo)} finished before, {len(todo)} to run), "
         f"{res.workers_per_run} worker(s) x (CPU {res.cpus_per_worker:g}, GPU {res.gpus_per_worker:g}) each, "
         f"at most {sweep.max_concurrent} at a time")
    for run in todo:
        echo(f"  {run.name}: {' '.join(_train_command(base, run, res.workers_per_run)[1:])}")
        if sweep.eval:
            echo(f"    then: {' '.join(_eval_command(sweep, Path(path).parent, run)[1:])}")
    if dry_run:
        return Path(sweep.out_dir) / "results.csv"
    import ray

    started_here = address == "local"
    if started_here:
        need = res.workers_per_run * res.cpus_per_worker * sweep.max_concurrent
        ray.init(num_cpus=max(int(math.ceil(need)), 1), include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address)
    try:
        task = ray.remote(_execute).options(num_cpus=res.workers_per_run * res.cpus_per_worker,
                                            num_gpus=res.workers_per_run * res.gpus_per_worker, max_retries=0)
        pending, waiting, failed = list(todo), {}, []
        while pending or waiting:
            while pending and len(waiting) < sweep.max_concurrent:
                run = pending.pop(0)
                run.out_dir.mkdir(parents=True, exist_ok=True)
                ref = task.remote(_train_command(base, run, res.workers_per_run), os.getcwd(),
                                  str((run.out_dir / "train.log").resolve()),
                                  _eval_command(sweep, Path(path).parent, run))
                waiting[ref] = run
            ready, _ = ray.wait(list(waiting), num_returns=1)
            run = waiting.pop(ready[0])
            code, wall = ray.get(ready[0])
            row = _summarize(base, run, code, wall, evaluated=sweep.eval is not None)
            write_atomic(run.out_dir / RESULT, json.dumps(row) + "\n")
            table = write_table(Path(sweep.out_dir), runs)
            done = row["status"] == "done"
            logs = f"{run.out_dir}/train.log" + (" and eval.log" if sweep.eval else "")
            loss = f"train {row['train_loss']:.4f}" if done else f"exit {code}, see {logs}"
            echo(f"  {run.name}: {row['status']} in {wall:.0f} s ({loss})")
            if row["status"] != "done":
                failed.append(run.name)
        table = write_table(Path(sweep.out_dir), runs)
        if failed:
            raise SweepError(f"sweep {sweep.name}: {len(failed)} run(s) failed ({', '.join(failed)}); "
                              f"run the sweep again to retry them")
        return table
    finally:
        if started_here:
            ray.shutdown()
