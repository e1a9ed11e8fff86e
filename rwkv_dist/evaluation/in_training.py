"""Downstream evaluation during training (the run config's `eval` section).

    eval: {tasks: [rwkv_dist_mc], every_steps: 500, limit: 200, include_path: tasks/}

Every `eval.every_steps` steps and at the last step, after that step's checkpoint and validation, every rank reads the
current weights, the fp32 master copies the checkpoint would hold (under ZeRO-3 a collective gather, one parameter at
a time), into a plain RWKV and runs lm-eval on it with the rwkv_dist backend. lm-eval on each rank sees the whole of
every task; the model's requests are split over the data-parallel ranks by document (a document's requests stay on
one rank, so its context still runs once for all its choices) and the answers are gathered back on every rank in
lm-eval's order. The scores are therefore the ones `rwkv-dist lm-eval` computes on the checkpoint of that step. Rank 0
writes them to TensorBoard (eval/TASK/METRIC) and to metrics.jsonl: {"step": S, "eval": {"TASK/METRIC": value},
"eval_seconds": ..., "eval_requests_per_rank": [...]}.

The training run does not see it: the evaluation touches neither the engine (it reads the weights, it runs a copy)
nor the data streams, and the RNG states it changes (lm-eval seeds Python's, NumPy's and torch's generators) are put
back, so the losses, the checkpoints and their exact resume are those of a run without evals.

The tasks and their datasets are looked up when the trainer starts, before any process group: an unknown task, a
missing include_path or a dataset that is not on the machine stops the run in one line before it trains.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig
from ..errors import ConfigError, DataError
from .backend import RWKVDistLM
from .harness import expand_tasks, load_tasks, quiet, run_tasks, task_manager


class InTrainingEval:
    """The `eval` section of a run, checked and with its tasks loaded; `maybe_run` is called after every step."""

    def __init__(self, cfg: RunConfig, source: str, tokenizer_bytes: bytes):
        from ..data import Tokenizer

        e = self.settings = cfg.eval
        if cfg.parallel.strategy == "pipeline":
            raise ConfigError(f"{source}: eval.tasks is not supported with strategy pipeline yet")
        self.include = [Path(p) for p in e.include_path]
        for folder in self.include:
            if not folder.is_dir():
                raise ConfigError(f"{source}: eval.include_path: {folder}: no such folder")
        try:
            self.names = expand_tasks(e.tasks)
            self.manager = task_manager(self.names, self.include)
            self.loaded = load_tasks(self.manager, self.names)
        except (ConfigError, DataError) as err:
            raise ConfigError(f"{source}: eval.tasks: {err}") from None
        self.last_step = cfg.schedule.steps
        self._folder = tempfile.TemporaryDirectory(prefix="rwkv_dist_eval_")  # the run's tokenizer, as a file
        path = Path(self._folder.name) / "tokenizer.model"
        path.write_bytes(tokenizer_bytes)
        self.tokenizer = Tokenizer(path)

    def due(self, step: int) -> bool:
        every = self.settings.every_steps
        return (every > 0 and step % every == 0) or step == self.last_step

    def maybe_run(self, trainer, step: int) -> dict[str, float] | None:
        """At a due step, on every rank (collective): the scores, {"TASK/METRIC": value}, on the reporting rank."""
        if not self.due(step):
            return None
        world, e = trainer.world, self.settings
        started = time.time()
        with preserved_rng():
            model = full_model(trainer.strategy.engine, trainer.cfg.model, world.device)
            lm = ShardedLM(world, model=model, tokenizer=self.tokenizer, batch_size=e.batch_size, device=str(world.device))
            with quiet(), progress_bars_held():
                results = run_tasks(lm, self.names, self.include, e.num_fewshot, e.limit, manager=self.manager,
                                    loaded=self.loaded, bootstrap_iters=0)  # scores only: no bootstrap stderr
            requests = lm.requests_run
            del lm, model
        per_rank = world.all_gather_object(requests)
        found = scores(results) if trainer.is_reporter else {}
        seconds = time.time() - started
        trainer.reporter.scalars(step, {f"eval/{k}": v for k, v in found.items()})
        trainer.reporter.record({"step": step, "eval": found, "eval_seconds": seconds, "eval_requests_per_rank": per_rank})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in found.items())
        trainer.reporter.print(f"step {step}: eval {shown} ({seconds:.1f} s)")
        return found if trainer.is_reporter else None


class ShardedLM(RWKVDistLM):
    """The rwkv_dist backend with its requests split over the ranks by document and the answers gathered back on every
    rank in lm-eval's order: lm-eval itself runs as one process on each rank (world size 1 to it), sees every
    document and computes, from the same answers, the metrics a single process computes. A call on every rank
    (collective), also where a rank has no request of the kind."""

    def __init__(self, world, **kwargs):
        super().__init__(**kwargs)
        self.world = world
        self.requests_run = 0  # requests this rank answered

    def _sharded(self, method, requests: list) -> list:
        owners: dict[tuple, int] = {}
        mine = []
        for i, req in enumerate(requests):
            doc = getattr(req, "doc_id", None)  # lm-eval's Instance: (task, document) of the request
            key = (getattr(req, "task_name", None), i if doc is None else doc)
            if owners.setdefault(key, len(owners) % self.world.size) == self.world.rank:
                mine.append(i)
        answers = list(method([requests[i] for i in mine])) if mine else []
        self.requests_run += len(mine)
        out: list = [None] * len(requests)
        for indices, part in self.world.all_gather_object((mine, answers)):
            for i, answer in zip(indices, part, strict=True):
                out[i] = answer
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._sharded(lambda part: super(ShardedLM, self).loglikelihood(part, disable_tqdm=True), requests)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._sharded(lambda part: super(ShardedLM, self).loglikelihood_rolling(part, disable_tqdm=True), requests)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._sharded(lambda part: super(ShardedLM, self).generate_until(part, disable_tqdm=True), requests)


def scores(results: dict | None) -> dict[str, float]:
    """lm-eval's results as {"TASK/METRIC": value} (metrics of a filter other than "none": TASK/METRIC/FILTER);
    standard errors and non-numbers left out."""
    out: dict[str, float] = {}
    for task, metrics in sorted(((results or {}).get("results") or {}).items()):
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            out[f"{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(value)
    return out


@contextlib.contextmanager
def progress_bars_held():
    """lm-eval draws a progress bar per task while it builds requests, which would break up the run's progress
    output: stderr is held meanwhile and passed on without the bars (all of it if the evaluation fails)."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise
    kept = [line for line in held.getvalue().splitlines(keepends=True)
            if "\r" not in line and not re.search(r"\d+%\|.*\|", line)]
    sys.stderr.write("".join(kept))


@contextlib.contextmanager
def preserved_rng():
    """Python's, NumPy's and torch's (CPU and CUDA) generator states as they were before (lm-eval seeds them)."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


@torch.no_grad()
def full_model(engine, model_cfg, device: torch.device):
    """A plain fp32 RWKV (eval mode) holding the engine's current weights: the fp32 master copies where DeepSpeed keeps
    them (ZeRO-3: gathered from every rank's partition; bf16 runs: the optimizer's fp32 copies), else the module's
    own. A collective under ZeRO-3: every rank of the engine calls it, and every rank gets the whole model."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from ..model.state_dict import load_rwkv

    sd = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:  # not trained through a DeepSpeed master copy (fp32 ZeRO-0, or frozen)
            gather = deepspeed.zero.GatheredParameters([param]) if hasattr(param, "ds_id") else contextlib.nullcontext()
            with gather:
                full = param.detach()
        sd[name] = full.to(device, torch.float32, copy=True)
    model = load_rwkv(sd, "the training weights")
    model.cfg = model_cfg  # as rwkv-dist lm-eval loads a checkpoint: same shapes, the run's settings
    return model.eval()
