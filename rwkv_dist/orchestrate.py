"""`rwkv-dist launch`: the trainer on N Ray Train workers, restarted by Ray after a failure.

Ray starts the workers (TorchTrainer + ScalingConfig), forms their process group (gloo on CPU, NCCL on GPU) and, when one
dies, tears the group down and starts a new one, up to --max-failures times. Recovery does not rely on Ray's own record
of checkpoints (a hard-killed worker can leave it one checkpoint behind): each new worker group resumes from the newest
committed checkpoint in the run's out_dir, exactly as `rwkv-dist train --resume auto` does. Workers report each
committed checkpoint to Ray as metrics. `--address local` starts a private Ray instance (no dashboard) and stops it at
the end; `auto` joins the cluster this node belongs to; `ray://HOST:10001` connects a Ray client.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig, load_run_config
from .errors import RWKVDistError

# environment the workers need that a remote cluster's processes would not inherit from this shell
# set in the runtime env of a launch that started its own Ray instance (address local)
PRIVATE_INSTANCE_ENV = "RWKV_DIST_PRIVATE_RAY"
FORWARDED_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "TMPDIR")


class LaunchError(RWKVDistError):
    """The Ray run failed (a worker died with no restarts left, or could not start)."""


@dataclass(frozen=True)
class LaunchPlan:
    config: str
    overrides: list[str]
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    address: str
    max_failures: int
    cwd: str
    out_dir: str

    def describe(self, cfg: RunConfig) -> str:
        s = cfg.schedule
        return "\n".join([
            f"run            {cfg.name}: RWKV-4 L{cfg.model.n_layer} D{cfg.model.n_embd}, {cfg.parallel.strategy}, "
            f"{cfg.precision}, {s.steps} steps x {s.global_batch_size} sequences of {cfg.model.ctx_len} tokens",
            f"ray            address={self.address} (local: a private instance, stopped at the end)",
            f"workers        {self.workers} x (CPU {self.cpus_per_worker:g}, GPU {self.gpus_per_worker:g}); "
            f"backend {'nccl' if self.gpus_per_worker else 'gloo'}; micro {s.micro_batch_size} x accum "
            f"{s.grad_accum} x {self.workers} ranks = {s.global_batch_size}",
            f"failures       up to {self.max_failures} restart(s), each resuming from the newest committed checkpoint",
            f"out_dir        {self.out_dir} (checkpoints, TensorBoard, metrics.jsonl; Ray's records in out_dir/ray)",
            f"each worker    (cd {self.cwd} &&) rwkv-dist train {shlex.quote(self.config)} "
            + " ".join(shlex.quote(o) for o in self.overrides) + " --resume auto",
        ])


def plan_launch(config: str, overrides: list[str], workers: int, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                address: str = "local", max_failures: int = 3) -> tuple[LaunchPlan, RunConfig]:
    """Validate everything that can be checked before Ray starts."""
    if workers < 1:
        raise LaunchError(f"--workers must be at least 1, got {workers}")
    if cpus_per_worker <= 0 or gpus_per_worker < 0:
        raise LaunchError(f"--cpus-per-worker must be > 0 and --gpus-per-worker >= 0, got {cpus_per_worker}, "
                          f"{gpus_per_worker}")
    if max_failures < 0:
        raise LaunchError(f"--max-failures must be >= 0, got {max_failures}")
    if not (address in ("local", "auto") or address.startswith("ray://")):
        raise LaunchError(f"--address must be local, auto or ray://HOST:PORT, got {address!r}")
    cfg = load_run_config(config, overrides)
    cfg.check_world_size(workers, config)
    from .train.trainer import check_inputs

    check_inputs(cfg, config)
    out_dir = str(Path(cfg.out_dir).resolve())
    overrides = [o for o in overrides if not o.startswith("out_dir=")] + [f"out_dir={out_dir}"]
    plan = LaunchPlan(str(Path(config).resolve()), overrides, workers, cpus_per_worker,
                      gpus_per_worker, address, max_failures, os.getcwd(), out_dir)
    return plan, cfg


def quiet_ray_logs() -> None:
    """Runs in every Ray process of a launch (worker_process_setup_hook). Ray Train's placement-group cleaner polls
    the state API, which lives in the dashboard process; with the dashboard off it warns about it every second. Ray
    Train also logs every `ray.train.report` of every rank (we report once per checkpoint) at INFO."""
    import logging

    from ray.train.v2._internal.execution import context

    quiet = ["ray.train.v2._internal.execution.controller.placement_group_cleaner"]
    if os.environ.get(PRIVATE_INSTANCE_ENV):
        # a private instance has no autoscaler: the controller's resource request to Ray Data's autoscaling
        # coordinator is moot, and when the actor starts slowly (a busy 2-core laptop) it logs a traceback for it
        quiet.append("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client")
        # the state API (the placement-group cleaner's) finds "the" instance by scanning the machine and fails when
        # another private instance runs there too (two runs, or the test suite, on one machine): name ours
        import ray

        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    for name in quiet:
        # a filter, not a level: Ray Train's dictConfig of the `ray.train` logger resets its children's levels
        logging.getLogger(name).addFilter(lambda record: record.levelno >= logging.ERROR)
    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # that module names its logger by its file path


def _worker(loop_config: dict) -> None:
    """One Ray Train worker: the ordinary trainer on the process group Ray formed."""
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    if Path(loop_config["cwd"]).is_dir():  # same layout on every node (or one machine): relative data paths work
        os.chdir(loop_config["cwd"])
    os.environ.update(RANK=str(ctx.get_world_rank()), WORLD_SIZE=str(ctx.get_world_size()),
                      LOCAL_RANK=str(ctx.get_local_rank()))
    from .train.trainer import Trainer

    cfg = load_run_config(loop_config["config"], loop_config["overrides"])

    def report(step: int, folder: Path) -> None:
        ray.train.report({"step": step, "checkpoint": str(folder)})

    summary = Trainer(cfg, loop_config["config"], resume="auto", on_checkpoint=report).run()
    dist.barrier()
    ray.train.report({"step": summary["steps"], "done": True,
                      **{k: v for k, v in summary.items() if isinstance(v, (int, float))}})


def _dead_workers(error: Exception, out_dir: str) -> str:
    """Which workers died ('rank 1 (pid 123 on host) died: ...'), then the ranks that failed because they did (a
    collective with a dead peer errors out)."""
    failures = getattr(error, "worker_failures", None) or {}

    def who(rank: int) -> str:
        info = Path(out_dir) / "workers" / f"rank_{rank:05d}.json"
        if info.is_file():
            meta = json.loads(info.read_text())
            return f"rank {rank} (pid {meta['pid']} on {meta['host']})"
        return f"rank {rank}"

    def first_line(exc: Exception) -> str:
        return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)[:200]

    died = {r: e for r, e in failures.items()
            if "health check" in str(e).lower() or "died" in str(e).lower() or "ActorDied" in type(e).__name__}
    others = {r: e for r, e in failures.items() if r not in died}
    if not failures:
        return str(error).strip().splitlines()[-1][:300]
    if not died:
        return "; ".join(f"{who(r)} failed: {first_line(e)}" for r, e in sorted(others.items()))
    text = "; ".join(f"{who(r)} died ({first_line(e)})" for r, e in sorted(died.items()))
    if others:
        text += "; then " + ", ".join(f"rank {r}" for r in sorted(others)) + " failed with it"
    return text


def launch(plan: LaunchPlan, cfg: RunConfig) -> dict:
    import ray
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started_here = plan.address == "local"
    # Ray Train's print patch sends each print() of a worker to its logger (stderr) as well as to stdout, which Ray's
    # log forwarding then shows twice; the trainer's lines are plain stdout, so the patch is off
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    if started_here:
        env_vars[PRIVATE_INSTANCE_ENV] = "1"
    runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": "rwkv_dist.orchestrate.quiet_ray_logs"}
    if started_here:
        import logging

        # a private instance keeps Ray's default token authentication; its notice that it is on is not news here
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(num_cpus=max(int(plan.workers * plan.cpus_per_worker + 0.999), 1) + 1, include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(address=plan.address, runtime_env=runtime_env)
    try:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"config": plan.config, "overrides": plan.overrides, "cwd": plan.cwd},
            torch_config=TorchConfig(backend="nccl" if plan.gpus_per_worker else "gloo"),
            scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=plan.gpus_per_worker > 0,
                                         resources_per_worker={"CPU": plan.cpus_per_worker,
                                                               **({"GPU": plan.gpus_per_worker}
                                                                  if plan.gpus_per_worker else {})}),
            run_config=RayRunConfig(name=cfg.name, storage_path=str(Path(plan.out_dir) / "ray"),
                                    failure_config=FailureConfig(max_failures=plan.max_failures)),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise LaunchError(f"run {cfg.name} failed after {plan.max_failures} restart(s) allowed by --max-failures: "
                              f"worker {_dead_workers(e, plan.out_dir)}") from None
        return dict(result.metrics or {})
    finally:
        if started_here:
            ray.shutdown()
