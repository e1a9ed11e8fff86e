"""Data parallelism: one DeepSpeed engine over the whole model on every rank.

    zero3  DeepSpeed ZeRO-3: parameters, gradients and optimizer state sharded over ranks (optional CPU offload). The
           model is built already sharded (deepspeed.zero.Init: no rank ever holds the whole model) and initialized
           one gathered parameter at a time by rank 0, which draws the same random numbers as an unsharded build.
    ddp    DeepSpeed ZeRO-0: plain data parallel, every rank holds everything, gradients all-reduced.
One step: for each of grad_accum micro-batches forward, loss, engine.backward; engine.step() at the boundary.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..config import RunConfig
from ..model import RWKV
from ..train.checkpoint import rank_files
from ..train.distributed import World
from ..train.optim import param_groups
from .common import GuardedAdamW, deepspeed_config, initialize, training_loss, with_activation_checkpointing


class DataParallel:
    def __init__(self, cfg: RunConfig, world: World, load_universal: bool = False, weights: dict | None = None):
        """weights: a whole state dict to start from instead of the initialization (checkpoint.init_from)."""
        import deepspeed

        self.cfg, self.world = cfg, world
        self.zero3 = cfg.parallel.strategy == "zero3"
        self.dp_rank, self.dp_size = world.rank, world.size
        self.context, self.context_rank, self.context_group = cfg.parallel.context, 0, None
        if self.context > 1:  # C consecutive ranks share each window, a piece each: one data-parallel replica
            from .context import context_groups

            self.context_group, self.context_rank, self.dp_rank = context_groups(self.context, world.size, world.rank)
            self.dp_size = world.size // self.context
        self.holds_loss = True  # every rank computes the loss of its own micro-batches (or pieces of them)
        self.reports = world.rank == 0
        self.needs_data = True
        self.owns_data_state = self.context_rank == 0  # a context group reads one stream: one copy in the checkpoint
        ds_config = deepspeed_config(cfg, world.device, 3 if self.zero3 else 0, cfg.schedule.grad_accum, world.size,
                                     load_universal)
        if self.zero3:
            model = self._build(ds_config, weights)
        else:
            model = self._model()
            initialize(model, cfg.seed, weights=weights)
        if cfg.parallel.activation_checkpointing:
            with_activation_checkpointing(model.blocks)
        o = cfg.optimizer
        self.optimizer = GuardedAdamW(param_groups(model, o), lr=o.lr_init, betas=o.betas, eps=o.eps)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_config,
                                               dist_init_required=False)

    def _build(self, ds_config: dict, weights: dict | None) -> RWKV:
        import deepspeed

        offload = self.cfg.parallel.offload_params
        with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device="cpu" if offload else None):
            model = self._model()

        @contextlib.contextmanager
        def gathered(param):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                yield param if self.world.is_main else None

        initialize(model, self.cfg.seed, edit=gathered, weights=weights)
        return model

    def _model(self) -> RWKV:
        """The model, uninitialized; with schedule.segment_len, the one that trains its windows in segments."""
        if self.context > 1:
            from .context import ContextParallelRWKV

            return ContextParallelRWKV(self.cfg.model, self.context_group, init=False)
        if self.cfg.segmented:
            from ..train.segmented import SegmentedRWKV

            return SegmentedRWKV(self.cfg.model, self.cfg.schedule.segment_len, self.cfg.l2wrap, init=False)
        return RWKV(self.cfg.model, init=False)

    # -- training ---------------------------------------------------------------------------------------------------
    def train_step(self, batches: list, corrupt_loss=None) -> tuple[list[torch.Tensor], float | None]:
        """Forward and backward of this rank's micro-batches, then the optimizer step. Returns the micro-batches'
        losses (detached) and the gradient norm before clipping."""
        losses, norm = [], None
        for j, (x, y) in enumerate(batches):
            x, y = self._piece(x.to(self.world.device)), self._piece(y.to(self.world.device))
            if self.cfg.segmented:  # the loss is computed segment by segment inside the model
                loss, objective = self.engine(x, y)
            else:
                loss, objective = training_loss(self.cfg, self.engine(x), y)
            if corrupt_loss is not None and j == 0:
                loss, objective = corrupt_loss(loss), corrupt_loss(objective)
            losses.append(loss.detach())
            self.engine.backward(objective)
            if j == len(batches) - 1:
                norm = self._replicated_grad_norm()
            self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return losses, (float(norm) if norm is not None else None)

    def _replicated_grad_norm(self) -> float | None:
        """The global gradient norm where DeepSpeed keeps none: fp32 ZeRO-0 clips the module's (already all-reduced,
        identical) gradients in place without recording the norm. Elsewhere None: DeepSpeed's own is used."""
        if self.zero3 or self.cfg.precision != "fp32":
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else None

    def _piece(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's piece of windows [B, T] under context parallelism (the whole windows otherwise)."""
        if self.context == 1:
            return t
        n = t.shape[1] // self.context
        return t[:, self.context_rank * n:(self.context_rank + 1) * n]

    @torch.no_grad()
    def forward_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """Logits of a batch (a collective under ZeRO-3: every rank calls it the same number of times); under context
        parallelism the whole windows' on the group's first rank, None on the others."""
        self.engine.eval()
        out = self.engine(self._piece(x.to(self.world.device)))
        self.engine.train()
        if self.context > 1:
            from .context import gather_pieces

            out = gather_pieces(out)
            return out if self.context_rank == 0 else None
        return out

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def save(self, root: Path, tag: str) -> None:
        self.engine.save_checkpoint(str(root), tag=tag, save_latest=False)

    def load(self, folder: Path) -> bool:
        path, _ = self.engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=True)
        return path is not None

    def files_to_check(self, folder: Path) -> list[Path]:
        return rank_files(folder, self.dp_rank)

    def model_state(self) -> dict:
        """Elements and bytes of parameters, fp32 master copies and optimizer moments held by this rank."""
        return model_state(self.engine, self.optimizer, self.world)


def model_state(engine, optimizer: torch.optim.Optimizer, world: World) -> dict:
    params = total = nbytes = 0
    seen = set()
    for p in engine.module.parameters():
        full = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        held = full if getattr(p, "ds_persist", True) else p.ds_tensor.numel()  # persistent: whole on every rank
        params, total, nbytes = params + held, total + full, nbytes + held * p.element_size()
        seen.add(id(p))
    wrapper = engine.optimizer
    masters = getattr(wrapper, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if masters is None:  # bf16 ZeRO-0 keeps lists of fp32 copies; fp32 ZeRO-0 steps the parameters themselves
        groups = getattr(wrapper, "fp32_groups", [])
        masters = [t for group in groups for t in (group if isinstance(group, (list, tuple)) else [group])]
    for t in masters:
        if id(t) not in seen:
            nbytes += t.numel() * t.element_size()
    for st in optimizer.state.values():
        nbytes += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    return {"rank": world.rank, "world_size": world.size, "param_elements_held": params,
            "param_elements_total": total, "model_state_bytes": nbytes}
