"""Process-group setup for the trainer: the same code under torchrun, the deepspeed launcher, Ray, or alone.

Launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a lone process gets a world of one
through an in-process store (no port). CPU runs use gloo (DS_ACCELERATOR=cpu), GPU runs NCCL.

Every collective the trainer issues itself goes through World's methods, which put the tensors on the communication
device first: NCCL only accepts CUDA tensors, so a CPU tensor handed to it fails the first step of every GPU run.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .hardware import keep_freed_cpu_memory


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (all on self.device; results come back as plain Python values or CPU tensors) ----------------
    def on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks of a tensor (any device), as a CPU tensor."""
        t = self.on_device(tensor.detach().clone())
        dist.all_reduce(t)
        return t.cpu()

    def mean(self, values: list[float]) -> list[float]:
        return (self.sum(torch.tensor(values, dtype=torch.float64)) / self.size).tolist()

    def broadcast_object(self, obj, src: int = 0):
        """`obj` of rank `src` on every rank (pickled through a tensor on the communication device)."""
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (pickled through tensors on the communication device:
        torch takes the current CUDA device, which setup() set to self.device)."""
        box = [None] * self.size
        dist.all_gather_object(box, obj)
        return box

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def setup() -> World:
    """Join (or, alone, create) the default process group, or adopt the launcher's; idempotent."""
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        keep_freed_cpu_memory()  # a CPU step's activations reuse freed memory, not fresh pages (~25% at ctx 8192)
    alone = "WORLD_SIZE" not in os.environ
    if alone:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    # DeepSpeed calls torch.distributed functions that torch 2.13 deprecates, once per collective
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    import deepspeed
    from deepspeed.utils import logger as deepspeed_logger

    # the trainer chooses torch's AdamW on purpose (bit-exact resume); DeepSpeed warns about it on every start
    deepspeed_logger.addFilter(lambda record: "untested optimizer" not in record.getMessage())
    # DeepSpeed's comm layer JIT-builds a shared-memory all-reduce op at init on CPU (~30 s of a first run's wall time
    # and GBs of RAM, per cache) that only its inference tensor parallelism (`inference_all_reduce`) calls; training's
    # collectives go through torch.distributed. Marked incompatible, the op is not built (build_shm_op returns None).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # also when a launcher (Ray Train) already formed the group: DeepSpeed's own comm layer must wrap it, or its config
    # checks (ZeRO-3 construction) see a world of one
    backend = "nccl" if use_cuda else "gloo"
    if alone and not dist.is_initialized():
        # a world of one meets itself through an in-process store, not a TCP port: a free port picked here would
        # only be bound seconds later (after DeepSpeed's import), and processes started side by side (a sweep's
        # runs, a test suite) took it in between (EADDRINUSE)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def finish(code: int = 0, wait: bool = True) -> None:
    """End a trainer process: wait for every rank (unless leaving on an error, which another rank may not share),
    flush, and leave without running interpreter teardown, where gloo's and DeepSpeed's threads race the shutdown and
    abort the process ("terminate called without an active exception"), a world of one included."""
    if dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
