"""Process-group setup for the trainer: the same code under torchrun, the deepspeed launcher, Ray, or alone.

Launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a lone process gets a world of one on a
free local port. CPU runs use gloo (DS_ACCELERATOR=cpu), GPU runs NCCL.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup() -> World:
    """Join (or, alone, create) the default process group, or adopt the launcher's; idempotent."""
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    # DeepSpeed calls torch.distributed functions that torch 2.13 deprecates, once per collective
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    import deepspeed

    # also when a launcher (Ray Train) already formed the group: DeepSpeed's own comm layer must wrap it, or its config
    # checks (ZeRO-3 construction) see a world of one
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_ranks_agree(flag: bool) -> bool:
    """True when `flag` holds on every rank."""
    t = torch.tensor([0 if flag else 1], dtype=torch.int32)
    dist.all_reduce(t)
    return int(t) == 0


def mean_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def finish(code: int = 0) -> None:
    """End a multi-process worker: wait for every rank, flush, and leave without running interpreter teardown, where
    gloo's threads race the shutdown and abort about one run in three (DESIGN §8)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
