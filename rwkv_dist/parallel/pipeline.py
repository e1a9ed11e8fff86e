"""Pipeline parallelism over the RWKV blocks, with DeepSpeed ZeRO-3 sharding inside every stage, and tensor
parallelism inside every block (rwkv_dist.parallel.tensor): the 3D engine.

Layout. The world is P stages x D data-parallel replicas x T tensor-parallel ranks; global rank r is stage
r // (D T), replica (r // T) % D, tensor rank r % T (megatron-core's order, its parallel_state groups). Each stage
holds a contiguous run of blocks (the first also the embedding and ln0, the last ln_out, the head and the loss), as
an `RWKVStage`: the model's own modules under their own names, so a stage's state dict is a slice of the model's.
Each stage is one DeepSpeed ZeRO-3 engine over its D replicas only: parameters, gradients and optimizer state are
sharded within the stage; only activations and their gradients cross stages, point to point (rank (s, d) talks to
(s +- 1, d)).

DeepSpeed's own PipelineEngine runs ZeRO-1 at most; one ZeRO-3 engine per stage works with these measures:
- an `mpu` gives the engine the stage's data-parallel group, and the replica's pipeline group as its "model
  parallel" group. Every stage parameter is marked model-parallel, so DeepSpeed sums the squared gradient norm over
  the stages: the clipping norm is the global one, the same as one process's;
- ZeRO-3's parameter coordinator checks its recorded trace with a broadcast over the whole world while the stages
  are at different points of their schedules; that one check is made over the stage's data-parallel group instead;
- DeepSpeed runs with gradient_accumulation_steps 1 and the loss is divided by the number of micro-batches here
  (DeepSpeed would divide every stage's output gradients again); engine.step() runs once per step;
- ZeRO-3 copies rather than adds a gradient while its micro-step counter is 0, and moves that counter on at the next
  forward; two backwards in a row (GPipe, the 1F1B cool-down) move it on explicitly after each backward.

Gathering (`parallel.pipeline_gather`). `micro_batch`: ZeRO-3 as usual, each parameter all-gathered for every use and
released after it (2m gathers per step with m micro-batches). `step`: the stage's parameters are gathered once at
the start of the step and marked persistent, so ZeRO-3's coordinator keeps them whole through every micro-batch;
they are re-partitioned before the update (gradients are reduce-scattered as usual either way).

Schedule. 1F1B (default): stage s runs min(P - s - 1, m) forwards, then alternates one forward and one backward, then
drains the backwards, so at most P - s micro-batches' activations are alive and the idle fraction is
(P - 1) / (m + P - 1). GPipe: all forwards, then all backwards. Backwards run in micro-batch order on every stage, as
gradient accumulation does in one process. Sends are non-blocking (isend), receives blocking: no pair of stages can
wait on each other.

Initialization. Rank 0 of each stage initializes the stage's parameters in the order of a whole-model build and draws
the random numbers of the other stages' parameters into scratch space, so every stage starts from exactly the
weights a one-process run starts from.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..config import RunConfig
from ..model import RWKV, RWKVConfig
from ..model.rwkv import Block
from ..train.distributed import World
from ..train.optim import param_groups
from .common import GuardedAdamW, deepspeed_config, initialize, training_loss, with_activation_checkpointing


def balanced_stage_layers(cfg: RWKVConfig, stages: int) -> list[int]:
    """Blocks per stage, contiguous, minimizing the largest stage's parameter count (the embedding counts on the
    first stage, ln_out and the head on the last)."""
    L = cfg.n_layer
    block = cfg._block_matmul_params() + 11 * cfg.n_embd
    edge = cfg.vocab_size * cfg.n_embd + 2 * cfg.n_embd
    cost = [block] * L
    cost[0] += edge
    cost[-1] += edge
    prefix = [0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the least possible largest stage over the first i blocks cut into k stages
    best = [[inf] * (L + 1) for _ in range(stages + 1)]
    cut = [[0] * (L + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, L + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    sizes, i = [], L
    for k in range(stages, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


@dataclass
class Layout:
    """Where this rank sits: its stage, replica and tensor-parallel rank, and the process groups it belongs to.
    Global rank = (stage * replicas + replica) * tensor + tensor_rank (megatron-core's default order)."""

    stages: int
    replicas: int
    tensor: int
    stage: int
    replica: int
    tensor_rank: int
    stage_group: object  # the data-parallel replicas of this (stage, tensor rank): ZeRO-3 shards over them
    pipe_group: object  # the stages of this (replica, tensor rank): activations flow through them
    model_group: object  # every stage and tensor rank of this replica: parameters are disjoint across it
    first_layer: int
    last_layer: int  # exclusive

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def model_rank(self) -> int:
        """Rank in the model-parallel group (DeepSpeed's mp_rank: checkpoint files carry it)."""
        return self.stage * self.tensor + self.tensor_rank

    def global_rank(self, stage: int, replica: int | None = None) -> int:
        replica = self.replica if replica is None else replica
        return (stage * self.replicas + replica) * self.tensor + self.tensor_rank


def make_layout(cfg: RunConfig, world: World) -> Layout:
    """The process groups of megatron-core's parallel_state (tensor-parallel groups of consecutive ranks, then data,
    then pipeline), so megatron's tensor-parallel layers and our stages and ZeRO-3 engines agree on every group."""
    from megatron.core import parallel_state

    P, T = cfg.parallel.pipeline_stages, cfg.parallel.tensor
    D = world.size // (P * T)
    if parallel_state.model_parallel_is_initialized():  # a second trainer in this process
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=T, pipeline_model_parallel_size=P,
                                             create_gloo_process_groups=False)
    stage, rest = divmod(world.rank, D * T)
    replica, tensor_rank = divmod(rest, T)
    assert (stage, tensor_rank) == (parallel_state.get_pipeline_model_parallel_rank(),
                                    parallel_state.get_tensor_model_parallel_rank())
    sizes = cfg.parallel.stage_layers or balanced_stage_layers(cfg.model, P)
    first = sum(sizes[:stage])
    return Layout(P, D, T, stage, replica, tensor_rank, parallel_state.get_data_parallel_group(),
                  parallel_state.get_pipeline_model_parallel_group(), parallel_state.get_model_parallel_group(),
                  first, first + sizes[stage])


class StageMPU:
    """What DeepSpeed asks of a model-parallel unit: data parallelism = the stage's replicas (of this tensor rank),
    "model" parallelism = the replica's stages and tensor ranks (they hold disjoint parameters, so gradient norms
    sum over them)."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def get_data_parallel_group(self):
        return self.layout.stage_group

    def get_data_parallel_world_size(self) -> int:
        return self.layout.replicas

    def get_data_parallel_rank(self) -> int:
        return self.layout.replica

    def get_model_parallel_group(self):
        return self.layout.model_group

    def get_model_parallel_world_size(self) -> int:
        return self.layout.stages * self.layout.tensor

    def get_model_parallel_rank(self) -> int:
        return self.layout.model_rank


class RWKVStage(nn.Module):
    """Blocks [first, last) of an RWKV model; the first stage also embeds, the last also heads. Names are the
    model's: emb.weight, blocks.N...., ln_out.*, head.weight. With tensor parallelism the blocks, the embedding and
    the head are megatron-core's split layers (rwkv_dist.parallel.tensor) under the same names."""

    def __init__(self, cfg: RWKVConfig, first: int, last: int, is_first: bool, is_last: bool,
                 tensor_parallel: bool = False):
        super().__init__()
        self.cfg, self.is_first, self.is_last = cfg, is_first, is_last
        block, embedding, head = Block, nn.Embedding, nn.Linear
        if tensor_parallel:
            from .tensor import TensorParallelBlock, vocab_parallel_layers

            block, (embedding, head) = TensorParallelBlock, vocab_parallel_layers()
        if is_first:
            self.emb = embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleDict({str(i): block(cfg, i) for i in range(first, last)})
        if is_last:
            self.ln_out = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
            self.head = head(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, T] (first stage) or hidden states [B, T, D] -> hidden states, or logits (last stage; with
        tensor parallelism this rank's slice of the vocabulary)."""
        if self.is_first:
            x = self.emb(x)
        for block in self.blocks.values():
            x, _ = block(x)
        return self.head(self.ln_out(x)) if self.is_last else x


def _patch_trace_check(group) -> None:
    """ZeRO-3's coordinator compares its recorded module trace across ranks with a broadcast over the whole world;
    in a pipeline the stages reach it at different times (and trace different modules), so compare within the
    stage's data-parallel group, the ranks that really share the trace."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator

    src = dist.get_global_rank(group, 0)

    def same_in_stage(ints: list[int]) -> None:
        box = [list(ints)]
        dist.broadcast_object_list(box, src=src, group=group)
        if box[0] != list(ints):
            raise RuntimeError(f"ZeRO-3 trace differs between data-parallel ranks of a stage: {box[0]} vs {ints}")

    coordinator.assert_ints_same_as_other_ranks = same_in_stage


def schedule(kind: str, stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    """The stage's order of forwards ("F", i) and backwards ("B", i)."""
    m = micro_batches
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warmup = min(stages - stage - 1, m)
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    return order + [("B", i) for i in range(m - warmup, m)]


class PipelineParallel:
    def __init__(self, cfg: RunConfig, world: World, load_universal: bool = False, weights: dict | None = None):
        """weights: a whole state dict to start from instead of the initialization (checkpoint.init_from)."""
        import deepspeed

        if load_universal:
            raise ValueError("pipeline and tensor-parallel checkpoints resume on the layout they were written with")
        self.cfg, self.world = cfg, world
        self.layout = L = make_layout(cfg, world)
        self.dp_rank, self.dp_size = L.replica, L.replicas
        self.holds_loss = L.is_last and L.tensor_rank == 0  # the tensor ranks compute the same loss: one reports it
        self.reports = self.holds_loss and L.replica == 0
        self.needs_data = L.is_first or L.is_last
        # the last stage and the other tensor ranks read the same streams: one copy in the checkpoint
        self.owns_data_state = L.is_first and L.tensor_rank == 0
        self.mpu = StageMPU(L)
        _patch_trace_check(L.stage_group)
        ds_config = deepspeed_config(cfg, world.device, 3, 1, L.replicas)
        stage = self._build(ds_config, weights)
        for p in stage.parameters():
            # the model-parallel group sums gradient norms: a parameter split over the tensor ranks (or held by this
            # stage alone) counts on every rank, a copy replicated over the tensor ranks on tensor rank 0 only
            p.model_parallel = getattr(p, "tensor_model_parallel", False) or L.tensor_rank == 0
        if cfg.parallel.activation_checkpointing:
            with_activation_checkpointing(stage.blocks.values())
        o = cfg.optimizer
        self.optimizer = GuardedAdamW(param_groups(stage, o), lr=o.lr_init, betas=o.betas, eps=o.eps)
        self.engine, *_ = deepspeed.initialize(model=stage, optimizer=self.optimizer, config=ds_config, mpu=self.mpu,
                                               dist_init_required=False)
        D, T = cfg.model.n_embd, cfg.model.ctx_len
        self.act_shape = (cfg.schedule.micro_batch_size, T, D)
        self.act_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        self.waited, self.step_stats = 0.0, {}

    def _build(self, ds_config: dict, weights: dict | None) -> RWKVStage:
        import deepspeed

        L, cfg = self.layout, self.cfg
        offload = cfg.parallel.offload_params
        with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device="cpu" if offload else None,
                                 data_parallel_group=L.stage_group, mpu=self.mpu):
            stage = RWKVStage(cfg.model, L.first_layer, L.last_layer, L.is_first, L.is_last, L.tensor > 1)
        own = dict(stage.named_parameters())
        with torch.device("meta"):
            whole = RWKV(cfg.model, init=False)
        names = {id(p): n for n, p in whole.named_parameters()}
        writer = L.replica == 0

        def scratch(param):
            return torch.empty(param.shape, dtype=torch.float32, device=self.world.device)

        @contextlib.contextmanager
        def edit(param):
            name = names[id(param)]
            if name not in own:  # another stage's: its random numbers are drawn all the same, into scratch
                yield scratch(param) if writer else None
            elif L.tensor == 1:
                with deepspeed.zero.GatheredParameters([own[name]], modifier_rank=0):
                    yield own[name] if writer else None
            else:  # the dense values are drawn whole on every tensor rank, which keeps its slice
                from .tensor import shard_of

                full = scratch(param) if writer else None
                yield full
                with deepspeed.zero.GatheredParameters([own[name]], modifier_rank=0):
                    if writer:
                        own[name].copy_(shard_of(full, name, L.tensor_rank, L.tensor))

        initialize(whole, cfg.seed, edit=edit, weights=weights)
        return stage

    # -- point to point -----------------------------------------------------------------------------------------------
    def _recv(self, stage: int, tag: int, shape=None, dtype=None) -> torch.Tensor:
        t = torch.empty(shape or self.act_shape, dtype=dtype or self.act_dtype, device=self.world.device)
        start = time.perf_counter()
        dist.recv(t, src=self.layout.global_rank(stage), tag=tag)
        self.waited += time.perf_counter() - start
        return t

    def _send(self, t: torch.Tensor, stage: int, tag: int, pending: list) -> None:
        t = t.detach().contiguous()
        pending.append((dist.isend(t, dst=self.layout.global_rank(stage), tag=tag), t))

    # -- training -----------------------------------------------------------------------------------------------------
    def train_step(self, batches: list, corrupt_loss=None) -> tuple[list[torch.Tensor], float | None]:
        """One step over the m micro-batches in `batches` ([(inputs, targets)] on the first and last stage, None
        elsewhere). Returns the micro-batches' losses on the last stage ([] elsewhere) and the global gradient norm."""
        L, m = self.layout, self.cfg.schedule.grad_accum
        started, self.waited = time.perf_counter(), 0.0
        held = self._gather_for_step() if self.cfg.parallel.pipeline_gather == "step" else []
        pending: list = []
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        losses = []
        for kind, i in schedule(self.cfg.parallel.pipeline_schedule, L.stage, L.stages, m):
            if kind == "F":
                if L.is_first:
                    x = batches[i][0].to(self.world.device)
                else:
                    x = self._recv(L.stage - 1, tag=i).requires_grad_()
                inputs[i] = x
                out = self.engine(x)
                if L.is_last:
                    loss, objective = self._loss(out, batches[i][1].to(self.world.device))
                    if corrupt_loss is not None and i == 0:
                        loss, objective = corrupt_loss(loss), corrupt_loss(objective)
                    if self.holds_loss:
                        losses.append(loss.detach())
                    outputs[i] = objective / m  # gradient accumulation's mean over micro-batches
                else:
                    self._send(out, L.stage + 1, tag=i, pending=pending)
                    outputs[i] = out
            else:
                out = outputs.pop(i)
                if L.is_last:
                    torch.autograd.backward(out)
                else:
                    grad = self._recv(L.stage + 1, tag=m + i, shape=out.shape, dtype=out.dtype)
                    torch.autograd.backward(out, grad)
                x = inputs.pop(i)
                if not L.is_first:
                    self._send(x.grad, L.stage - 1, tag=m + i, pending=pending)
                self.engine.optimizer.clear_backward_seen_flag()  # the next backward accumulates, not overwrites
        for work, _ in pending:
            work.wait()
        # the share of the schedule this stage spent waiting for its neighbours: the measured pipeline bubble
        self.step_stats = {"pipeline_idle": self.waited / max(time.perf_counter() - started, 1e-9)}
        if held:  # back to shards before the optimizer updates them
            for p in held:
                p.ds_persist = False
            held[0].partition(param_list=held)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return losses, (float(norm) if norm is not None else None)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layout.tensor == 1:
            return training_loss(self.cfg, logits, targets)
        from .tensor import vocab_parallel_loss

        return vocab_parallel_loss(logits, targets, self.cfg.l2wrap)

    @torch.no_grad()
    def _gather_for_step(self) -> list:
        """All-gather the stage's sharded parameters once and pin them whole for this step's micro-batches."""
        params = [p for p in self.engine.module.parameters() if not p.ds_persist]
        if params:
            params[0].all_gather(param_list=params)
            for p in params:
                p.ds_persist = True
        return params

    @torch.no_grad()
    def forward_logits(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Logits of a batch on the last stage (None elsewhere); every rank of the pipeline calls it together."""
        L = self.layout
        self.engine.eval()
        if L.is_first:
            h = x.to(self.world.device)
            shape = (*h.shape, self.cfg.model.n_embd)
        else:
            shape = (x.shape[0], x.shape[1], self.cfg.model.n_embd) if x is not None else self.act_shape
            h = self._recv(L.stage - 1, tag=0, shape=shape)
        out = self.engine(h)
        self.engine.train()
        if not L.is_last:
            dist.send(out.contiguous(), dst=L.global_rank(L.stage + 1), tag=0)
            return None
        if L.tensor > 1:
            from .tensor import gather_vocab

            out = gather_vocab(out)
        return out if L.tensor_rank == 0 else None

    # -- checkpoints --------------------------------------------------------------------------------------------------
    def save(self, root: Path, tag: str) -> None:
        self.engine.save_checkpoint(str(root), tag=tag, save_latest=False)  # files carry mp_rank_{stage:02d}

    def load(self, folder: Path) -> bool:
        path, _ = self.engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=True)
        return path is not None

    def files_to_check(self, folder: Path) -> list[Path]:
        from ..train.checkpoint import rank_files

        return rank_files(folder, self.dp_rank, self.layout.model_rank)

    def model_state(self) -> dict:
        from .data_parallel import model_state

        L = self.layout
        return {**model_state(self.engine, self.optimizer, self.world), "stage": L.stage, "tensor_rank": L.tensor_rank}
