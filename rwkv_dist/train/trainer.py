"""The trainer: RWKV-4 under a parallel strategy, fed by the streaming loader, checkpointed and resumable exactly.

One optimizer step, on every rank: the strategy (rwkv_dist.parallel) runs the step's grad_accum micro-batches forward
and backward and applies the update:
    zero3 / ddp  DataParallel: one DeepSpeed engine over the whole model (ZeRO-3 sharded, or replicated)
    pipeline     PipelineParallel: the blocks cut into stages, one ZeRO-3 engine per stage over its replicas, 1F1B
The trainer owns what does not depend on the strategy: the LR schedule, the data, the loss and guard bookkeeping,
checkpoint commits, validation, reporting.
Data. Micro-batch j of data-parallel rank r reads the stream of virtual rank r * grad_accum + j out of
dp_size * grad_accum, so a step's global batch is the same for every factorization of ranks x grad_accum, and a
pipeline run reads what a data-parallel run of the same global batch reads.
Guards. A step whose gradients are not finite is not applied (DeepSpeed skips it on a non-finite global norm; the
optimizer refuses non-finite gradients where DeepSpeed does not look) and is counted; `guard.max_bad_steps` of them in
a row roll the model and optimizer back to the last checkpoint while the data stream moves on past the bad batches
(PaLM's recipe). Loss spikes are logged.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from ..config import ParallelConfig, RunConfig
from ..data import Source, TokenLoader, load_manifest, validation_batches
from ..data.shards import check_same_tokenizer, read_bytes, shard_url
from ..data.tokenizer import MODEL_FILE
from ..errors import CheckpointError, ConfigError, DataError, RWKVDistError
from . import distributed
from .checkpoint import (CheckpointStore, check_pickles, read_complete, read_rank_rng, read_rank_states, step_name,
                         universal_checkpoint)
from .hardware import choose_precision, detect_peak_flops, mfu
from .loss import token_cross_entropy
from .observe import Reporter, memory_bytes
from .optim import lr_at


class TrainingError(RWKVDistError):
    """The run cannot go on (e.g. non-finite steps persist after the allowed rollbacks)."""


@dataclass
class TrainState:
    """What the trainer itself must carry across a resume (besides the engine and the data streams)."""

    step: int = 0  # optimizer steps taken (including skipped ones: their batches are consumed)
    tokens: int = 0
    skipped_steps: int = 0
    rollbacks: int = 0
    loss_spikes: int = 0
    recent_losses: list[float] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: RunConfig, source: str = "config", resume: str | None = None, on_checkpoint=None):
        """on_checkpoint(step, folder): called on every rank after each committed checkpoint."""
        self.source, self.on_checkpoint = source, on_checkpoint
        cfg.check_world_size(int(os.environ.get("WORLD_SIZE", 1)), source)  # set by every launcher
        self.tokenizer_sha256, self.tokenizer_bytes = check_inputs(cfg, source)  # before any process group or file
        self.downstream = None  # eval.tasks: looked up (tasks, datasets) before any process group too
        if cfg.eval.tasks:
            from ..evaluation.in_training import InTrainingEval

            self.downstream = InTrainingEval(cfg, source, self.tokenizer_bytes)
        # read and checked before any process group: a wrong file is one line, not a hang
        init_from = read_init_weights(cfg, source) if cfg.checkpoint.init_from else None
        self.world = distributed.setup()
        self.out = Path(cfg.out_dir)
        self.store = CheckpointStore(self.out / "checkpoints")
        self.resume_from = self._resolve_resume(cfg.checkpoint.resume if resume is None else resume)
        saved = self._saved_config(self.resume_from) if self.resume_from is not None else None
        # decided by rank 0 for all: on a CPU `auto` times matmuls, which ranks doing at once could read differently
        chosen = choose_precision(cfg.precision, self.world.device, saved["precision"] if saved else None) \
            if self.world.is_main else None
        precision, self.precision_reason = self.world.broadcast_object(chosen)
        self.cfg = cfg = cfg.model_copy(update={"precision": precision})
        load_from = None
        if saved is not None:
            self._check_compatible(self.resume_from, saved)
            load_from = self._engine_checkpoint(self.resume_from)

        self.universal = load_from is not None and load_from != self.resume_from
        if cfg.parallel.strategy == "pipeline" or cfg.parallel.tensor > 1:  # the 3D engine (P x D x T)
            from ..parallel.pipeline import PipelineParallel as Strategy
        else:
            from ..parallel.data_parallel import DataParallel as Strategy
        self.init_from = init_from is not None and self.resume_from is None
        self.strategy = Strategy(cfg, self.world, load_universal=self.universal,
                                 weights=init_from if self.init_from else None)
        del init_from
        self.optimizer = self.strategy.optimizer
        # rank 0 of the ranks that compute the loss reports; under a pipeline that is on the last stage
        self.is_reporter = self.strategy.reports
        self.state = TrainState()
        s, a = cfg.schedule, cfg.schedule.grad_accum
        sources = [Source(x.location, x.weight, x.name) for x in cfg.data.sources]
        dp_rank, dp_size = self.strategy.dp_rank, self.strategy.dp_size
        self.loaders = [TokenLoader(sources, cfg.model.ctx_len, s.micro_batch_size, rank=dp_rank * a + j,
                                    world_size=dp_size * a, num_workers=cfg.data.num_workers, seed=cfg.seed,
                                    on_error=cfg.data.on_error, tokenizer_sha256=self.tokenizer_sha256)
                        for j in range(a)] if self.strategy.needs_data else []

        if self.resume_from is not None:
            self._restore(self.resume_from, data=True, engine_folder=load_from)
        self.streams = [iter(loader) for loader in self.loaders]
        self.tokens_per_step = s.global_batch_size * cfg.model.ctx_len
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        if cfg.logging.peak_flops:
            self.peak_flops, self.peak_source = cfg.logging.peak_flops, "config logging.peak_flops"
        else:
            # measured once, by rank 0 while the others wait: ranks timing matmuls at once would share the cores
            found = detect_peak_flops(self.world.device, dtype) if self.world.is_main else None
            self.peak_flops, self.peak_source = self.world.broadcast_object(found)
        self.flops_per_token = 3 * cfg.model.flops_per_token_fwd()
        self._mfu_warned = False
        self._val_batches = None
        self._fired: set[int] = set()

    # -- resuming ---------------------------------------------------------------------------------------------------
    def _resolve_resume(self, spec: str) -> Path | None:
        """Rank 0 decides which checkpoint (if any) the run resumes from and every rank takes its answer: ranks that
        each scanned a shared folder on their own could disagree while a save is being committed."""
        answer: tuple[str | None, str | None] = (None, None)
        if self.world.is_main:
            try:
                found = self.store.resolve(spec)
                answer = (str(found) if found is not None else None, None)
            except CheckpointError as e:
                answer = (None, str(e))
        path, error = self.world.broadcast_object(answer)
        if error is not None:
            raise CheckpointError(error)
        return Path(path) if path is not None else None

    @staticmethod
    def _saved_config(folder: Path) -> dict:
        return yaml.safe_load((folder / "config.yaml").read_text())

    def _check_compatible(self, folder: Path, saved: dict) -> None:
        """A checkpoint resumes only into the same model, strategy, precision, seed and data mixture. The data is
        matched by identity (the loader checks each source's manifest), not by location: shards may move."""
        now = self.cfg.model_dump(mode="json")
        saved = json.loads(json.dumps(saved))
        for cfg in (saved, now):
            cfg["data"]["sources"] = [{k: v for k, v in src.items() if k != "location"} for src in cfg["data"]["sources"]]
        for key in ("model", "precision", "seed", "parallel.strategy", "parallel.pipeline_stages",
                    "parallel.stage_layers", "parallel.tensor", "parallel.context", "data.sources"):
            a, b = saved, now
            for part in key.split("."):
                a, b = (a or {}).get(part), (b or {}).get(part)
            if a is None and key.startswith("parallel."):  # written before the field existed: it had its default
                a = ParallelConfig.model_fields[key.removeprefix("parallel.")].default
            if a != b:
                raise CheckpointError(f"{folder}: saved with {key} = {a!r}, this run has {b!r}; "
                                      f"start a new out_dir or set checkpoint.resume=none")

    def _engine_checkpoint(self, folder: Path) -> Path:
        """The folder the engine loads: the checkpoint itself, or, when it was written by another number of ranks, a
        universal (world-size-free) copy that rank 0 converts once and every rank re-shards from."""
        saved_world = read_complete(folder)["world_size"]
        if saved_world == self.world.size:
            return folder
        strategy, precision = self.cfg.parallel.strategy, self.cfg.precision
        if strategy == "pipeline" or self.cfg.parallel.tensor > 1 or self.cfg.parallel.context > 1:
            raise CheckpointError(f"{folder}: written by {saved_world} rank(s); a {strategy} checkpoint with "
                                  f"parallel.tensor / context = {self.cfg.parallel.tensor} / {self.cfg.parallel.context} "
                                  f"resumes only on {saved_world} rank(s), "
                                  f"this run has {self.world.size} (export it and start from the weights: "
                                  f"checkpoint.init_from)")
        if strategy == "ddp" and precision == "bf16":
            raise CheckpointError(f"{folder}: written by {saved_world} rank(s); a bf16 ddp checkpoint resumes only on "
                                  f"{saved_world} rank(s), this run has {self.world.size}")
        if strategy == "ddp":  # the module and optimizer state are replicated: any world size reads them as they are
            return folder
        error = None
        if self.world.is_main:
            try:
                universal_checkpoint(folder, self.store.root / "universal")
            except Exception as e:  # noqa: BLE001 - reported on every rank as one line
                error = f"{folder}: converting the {saved_world}-rank checkpoint for {self.world.size} rank(s) failed: {e}"
        error = self.world.broadcast_object(error)
        if error is not None:
            raise CheckpointError(error)
        return self.store.root / "universal" / folder.name

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def save(self) -> None:
        step, rank = self.state.step, self.world.rank
        tag, folder = self.store.begin(step, self.world.is_main)
        self.world.barrier()  # leftovers of an interrupted save are gone before anyone writes
        self.strategy.save(self.store.root, tag)
        state = {"rank": rank, "world_size": self.world.size, **asdict(self.state),
                 "data": [loader.state_dict() for loader in self.loaders] if self.strategy.owns_data_state else []}
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        self.store.write_rank_state(folder, rank, state, rng)
        if self.cfg.faults.crash_in_save_at_step == step and self.world.is_main:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: the files are written, the commit is not
        self.world.barrier()
        if self.world.is_main:
            self.store.commit(folder, step, self.world.size, yaml.safe_dump(self.cfg.model_dump(mode="json")),
                              self.tokenizer_bytes, self.cfg.checkpoint.keep_last)
        self.world.barrier()
        self.reporter.print(f"checkpoint {self.store.root / step_name(step)}")
        if self.on_checkpoint is not None:
            self.on_checkpoint(step, self.store.root / step_name(step))

    def _restore(self, folder: Path, data: bool, engine_folder: Path | None = None) -> None:
        """Engine state from `engine_folder` (default: `folder`), trainer and data state from `folder`."""
        engine_folder = engine_folder or folder
        # only what this rank will read (a universal copy is read whole by every rank)
        check_pickles(engine_folder, None if engine_folder != folder else self.strategy.files_to_check(engine_folder))
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if not self.strategy.load(engine_folder):
            raise CheckpointError(f"{engine_folder}: DeepSpeed found no engine state in it")
        # A universal load gives every group the settings of group 0, and every parameter the same `step` tensor
        # object, which AdamW then increments once per group per step: restore the settings, unshare the counters.
        for group, settings in zip(self.optimizer.param_groups, groups):
            group.update({k: v for k, v in settings.items() if k not in ("lr", "initial_lr")})
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        states = read_rank_states(folder)
        saved = {k: v for k, v in states[0].items() if k in TrainState.__dataclass_fields__}
        rollbacks = self.state.rollbacks
        self.state = TrainState(**saved)
        if not data:  # a rollback: the counters of what went wrong since the checkpoint are kept
            self.state.rollbacks = rollbacks
            return
        flat = [s for st in states for s in st["data"]]
        for loader in self.loaders:
            loader.load_state_dict(flat)
        rng = read_rank_rng(folder, self.world.rank) if len(states) == self.world.size else None
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])

    # -- one step ---------------------------------------------------------------------------------------------------
    def _train_step(self) -> tuple[float, bool, float | None]:
        """(mean loss over the global batch, whether the update was applied, the gradient norm before clipping)."""
        step = self.state.step + 1
        lr = lr_at(step - 1, self.cfg.optimizer, self.cfg.schedule.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        self.optimizer.stepped = False
        self.lr = lr
        batches = [next(stream) for stream in self.streams]
        corrupt = None
        if self.is_reporter and step in self.cfg.faults.nan_loss_at_steps and step not in self._fired:
            self._fired.add(step)  # a transient fault: it does not recur when a rollback replays the step
            corrupt = _make_nan

        losses, norm = self.strategy.train_step([(b.inputs, b.targets) for b in batches], corrupt)
        local = torch.stack(losses).double().sum().item() if losses else 0.0  # one device sync per step
        total, count, stepped = self.world.sum(torch.tensor([local, len(losses), float(self.optimizer.stepped)],
                                                            dtype=torch.float64)).tolist()
        return total / count, stepped == self.world.size, norm

    def _rollback(self) -> None:
        st = self.state
        found = self.store.committed()
        if not found:
            raise TrainingError(f"{st.skipped_steps} non-finite steps, {self.cfg.guard.max_bad_steps} in a row at step "
                                f"{st.step}, and no checkpoint to roll back to")
        if st.rollbacks >= self.cfg.guard.max_rollbacks:
            raise TrainingError(f"non-finite steps persist at step {st.step} after {st.rollbacks} rollbacks "
                                f"(guard.max_rollbacks)")
        st.rollbacks += 1
        self.reporter.print(f"[red]{self.cfg.guard.max_bad_steps} non-finite steps in a row at step {st.step}: rolling "
                            f"back to {found[-1].name} (rollback {st.rollbacks}); the data stream moves on")
        skipped = st.skipped_steps
        self._restore(found[-1], data=False)
        self.state.skipped_steps = skipped
        self.reporter.restart(self.state.step, "rollback")

    def validate(self) -> float | None:
        """Mean token loss over the first logging.val_batches batches of the val split, the same set for any world
        size; ranks share the batches and all run the same number of forwards (ZeRO-3 gathers collectively)."""
        if self.cfg.data.val is None:
            return None
        if self._val_batches is None:
            self._val_batches = list(validation_batches(self.cfg.data.val, self.cfg.model.ctx_len,
                                                        self.cfg.schedule.micro_batch_size,
                                                        max_batches=self.cfg.logging.val_batches))
        batches, W = self._val_batches, self.strategy.dp_size
        if not batches:
            return None
        mine = batches[self.strategy.dp_rank :: W]
        sums = torch.zeros(2, dtype=torch.float64)
        for i in range(math.ceil(len(batches) / W)):
            x, y = mine[i] if i < len(mine) else batches[0]
            logits = self.strategy.forward_logits(x)
            if logits is not None and i < len(mine):
                sums[0] += token_cross_entropy(logits, y, reduction="sum").item()
                sums[1] += y.numel()
        total, count = self.world.sum(sums).tolist()
        return total / count

    def model_state(self) -> dict:
        """Elements and bytes of parameters, fp32 master copies and optimizer moments held by this rank."""
        return self.strategy.model_state()

    def logits(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The training model's logits on the reporting rank, None elsewhere (a collective: call on every rank)."""
        out = self.strategy.forward_logits(tokens)
        return out.float().cpu() if out is not None and self.is_reporter else None

    def _mfu(self, tokens_per_s: float) -> float | None:
        value = mfu(self.flops_per_token, tokens_per_s, self.world.size, self.peak_flops)
        if value is None and not self._mfu_warned:
            self._mfu_warned = True
            self.reporter.print(f"[yellow]warning: MFU would exceed 100% against the peak of {self.peak_flops:.3g} "
                                f"FLOP/s ({self.peak_source}): the peak is wrong; MFU is reported as unknown "
                                f"(set logging.peak_flops)")
        return value

    # -- the loop ---------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, st, log = self.cfg, self.state, self.cfg.logging
        self.reporter = Reporter(self.out, self.is_reporter, cfg.schedule.steps, st.step, log.every_steps,
                                 resumed=self.resume_from is not None)
        workers = self.out / "workers"  # which process is which rank, for operators (and the fault tests)
        workers.mkdir(parents=True, exist_ok=True)
        (workers / f"rank_{self.world.rank:05d}.json").write_text(json.dumps(
            {"rank": self.world.rank, "pid": os.getpid(), "host": socket.gethostname(), "start_step": st.step}) + "\n")
        if self.world.is_main:
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        if self.is_reporter:
            where = (f"resumed from {self.resume_from}" if self.resume_from else
                     f"from the weights of {cfg.checkpoint.init_from} (fresh optimizer)" if self.init_from else
                     "from scratch")
            layout = cfg.parallel.strategy
            if cfg.parallel.context > 1:
                layout += f" x context parallel {cfg.parallel.context}"
            if hasattr(self.strategy, "layout"):
                L = self.strategy.layout
                layout = " x ".join(filter(None, [
                    f"pipeline {L.stages} stages ({cfg.parallel.pipeline_schedule})" if L.stages > 1 else "",
                    f"{L.replicas} ZeRO-3 replicas", f"tensor parallel {L.tensor}" if L.tensor > 1 else ""]))
            self.reporter.print(f"{cfg.name}: RWKV-4 L{cfg.model.n_layer} D{cfg.model.n_embd} "
                                f"({cfg.model.num_params():,} parameters), {layout} on {self.world.size} rank(s), "
                                f"{where} at step {st.step}")
            self.reporter.print(f"precision {cfg.precision} ({self.precision_reason}); peak "
                                f"{self.peak_flops / 1e12:.3g} TFLOP/s/device ({self.peak_source})")
        bad_streak, val_loss, started, steps_run = 0, None, time.time(), 0
        recent = deque(st.recent_losses, maxlen=100)
        last_losses: deque[float] = deque(maxlen=20)
        while st.step < cfg.schedule.steps:
            t0 = time.time()
            loss, applied, norm = self._train_step()
            steps_run += 1  # steps computed by this process, also those a rollback discards
            st.step += 1
            st.tokens += self.tokens_per_step
            if applied:
                bad_streak = 0
                if len(recent) >= 20:
                    mean = sum(recent) / len(recent)
                    std = math.sqrt(sum((v - mean) ** 2 for v in recent) / len(recent))
                    if loss > mean + cfg.guard.spike_sigmas * max(std, 1e-6):
                        st.loss_spikes += 1
                        self.reporter.print(f"[yellow]loss spike at step {st.step}: {loss:.4f} vs mean {mean:.4f} "
                                            f"(std {std:.4f} over the last {len(recent)} steps)")
                recent.append(loss)
                last_losses.append(loss)
                st.recent_losses = list(recent)
            else:
                st.skipped_steps += 1
                bad_streak += 1
                self.reporter.print(f"[red]step {st.step}: non-finite loss or gradients (loss {loss}); update skipped "
                                    f"({st.skipped_steps} so far)")
            dt = time.time() - t0
            tokens_per_s = self.tokens_per_step / dt
            record = {"step": st.step, "loss": loss, "lr": self.lr, "grad_norm": norm if applied else None,
                      "applied": applied, "tokens": st.tokens, "tokens_per_s": tokens_per_s,
                      "mfu": self._mfu(tokens_per_s), "memory_bytes": memory_bytes(self.world.device),
                      "skipped_steps": st.skipped_steps, "rollbacks": st.rollbacks, "loss_spikes": st.loss_spikes,
                      **getattr(self.strategy, "step_stats", {})}
            self.reporter.step(record, write_scalars=st.step % log.every_steps == 0 or st.step == cfg.schedule.steps)
            if bad_streak >= cfg.guard.max_bad_steps:
                self._rollback()
                st, bad_streak = self.state, 0
                recent = deque(st.recent_losses, maxlen=100)
                continue
            if st.step % cfg.checkpoint.every_steps == 0 or st.step == cfg.schedule.steps:
                self.save()
            if (log.val_every_steps and st.step % log.val_every_steps == 0) or st.step == cfg.schedule.steps:
                val_loss = self.validate()
                if val_loss is not None:
                    self.reporter.scalars(st.step, {"val/loss": val_loss})
                    self.reporter.record({"step": st.step, "val_loss": val_loss})
                    self.reporter.print(f"step {st.step}: val loss {val_loss:.4f} (perplexity {math.exp(val_loss):.2f})")
            if self.downstream is not None:  # downstream tasks on the current weights (every rank; a collective)
                self.downstream.maybe_run(self, st.step)
        wall = time.time() - started
        held = self.model_state()
        ranks = self.out / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        (ranks / f"rank_{self.world.rank:05d}.json").write_text(json.dumps(held) + "\n")
        if self.world.is_main:  # a run resumed on fewer ranks: the files of ranks it no longer has are stale
            for stale in ranks.glob("rank_*.json"):
                if int(stale.stem.removeprefix("rank_")) >= self.world.size:
                    stale.unlink()
        tokens_per_s = steps_run * self.tokens_per_step / wall if wall > 0 else 0.0
        run_mfu = self._mfu(tokens_per_s)
        summary = {
            "run": cfg.name, "steps": st.step, "steps computed": steps_run, "tokens": st.tokens,
            "wall time (s)": round(wall, 1), "tokens/s": tokens_per_s,
            "MFU": run_mfu if run_mfu is not None else "unknown (peak too low)",
            "precision": cfg.precision,
            "train loss (mean of last 20)": sum(last_losses) / len(last_losses) if last_losses else float("nan"),
            "val loss": val_loss if val_loss is not None else "n/a",
            "val perplexity": math.exp(val_loss) if val_loss is not None else "n/a",
            "skipped steps": st.skipped_steps, "rollbacks": st.rollbacks, "loss spikes": st.loss_spikes,
            "peak memory (GiB)": memory_bytes(self.world.device) / 2**30,
            "model-state bytes on rank 0": held["model_state_bytes"],
            "checkpoint": str(self.store.committed()[-1]) if self.store.committed() else "none",
            "tensorboard": str(self.out / "tensorboard"),
        }
        self.reporter.close(summary)
        return summary


def _make_nan(loss: torch.Tensor) -> torch.Tensor:
    return loss * float("nan")


def check_inputs(cfg: RunConfig, where: str) -> tuple[str, bytes]:
    """Data, vocabulary and out_dir checks that need no process group; returns the tokenizer's (sha256, bytes)."""
    manifests = []
    for i, src in enumerate(cfg.data.sources):
        try:
            manifests.append(load_manifest(src.location))
        except DataError as e:
            raise ConfigError(f"{where}: data.sources.{i}.location: {e}") from None
    vocab = manifests[0].tokenizer.vocab_size
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"{where}: model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's tokenizer "
                          f"({vocab} tokens, {cfg.data.sources[0].location})")
    if cfg.data.val is not None:
        try:
            val = load_manifest(cfg.data.val)
        except DataError as e:
            raise ConfigError(f"{where}: data.val: {e}") from None
        if not val.shards("val"):
            raise ConfigError(f"{where}: data.val: {cfg.data.val} has no val split (make shards with --val-fraction)")
        try:
            check_same_tokenizer(val, manifests[0].tokenizer.sha256, cfg.data.val, "the training data")
        except DataError as e:
            raise ConfigError(f"{where}: data.val: {e}") from None
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{where}: out_dir: {out} exists and is not a folder")
    return manifests[0].tokenizer.sha256, read_bytes(shard_url(cfg.data.sources[0].location, MODEL_FILE))


def read_init_weights(cfg: RunConfig, source: str) -> dict[str, torch.Tensor]:
    """checkpoint.init_from as a whole fp32 state dict with this run's model shapes (every rank reads it: a recovery
    path, where a run continues on another layout from exported weights)."""
    from ..model import RWKV
    from ..model.state_dict import check_state_dict, read_state_dict
    from .weights import checkpoint_weights

    path = Path(cfg.checkpoint.init_from)
    try:
        sd = read_state_dict(path) if path.is_file() else checkpoint_weights(path)[0]
        with torch.device("meta"):
            expected = RWKV(cfg.model, init=False).state_dict()
        check_state_dict(sd, expected, str(path))
    except CheckpointError as e:
        raise ConfigError(f"{source}: checkpoint.init_from: {e}") from None  # e names the file
    return {k: v.float() for k, v in sd.items()}


def train(cfg: RunConfig, source: str = "config", resume: str | None = None) -> dict:
    return Trainer(cfg, source, resume).run()
