"""Tensor parallelism for RWKV-4 with megatron-core's layers, applied from outside the model.

RWKV-4 splits cleanly over T ranks because WKV, time_decay and time_first act per channel:

    TimeMix     key, value, receptance   ColumnParallel (D -> D/T local channels; time_decay, time_first sliced alike)
                WKV                      on the local channels, no communication
                output                   RowParallel (D/T -> D, all-reduce)
    ChannelMix  key                      ColumnParallel (D -> 4D/T)
                value                    RowParallel (4D/T -> D, all-reduce)
                receptance               replicated (it gates the full-width output)
    emb, head   vocabulary-parallel: VocabParallelEmbedding, ColumnParallel head; the loss is megatron's
                vocab_parallel_cross_entropy, so full logits never exist during training
    LayerNorms, time_mix                 act on the replicated residual stream, replicated

The residual stream stays replicated on every tensor-parallel rank: each column-parallel layer all-reduces its input
gradient, so replicated parameters get identical gradients everywhere and stay in step without communication.
Modules keep the dense model's names, and a tensor-parallel parameter is a slice of the dense one
(`partition_dim`), so checkpoints consolidate into the ordinary state dict (`full_shape`, `shard_of`).

Groups come from megatron-core's parallel_state with its default order (tensor fastest, then data, then pipeline):
global rank = (stage * D + replica) * T + t, so a tensor-parallel group is T consecutive ranks, inside one node.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel
from torch import nn

from ..model.config import RWKVConfig
from ..model.rwkv import Block, ChannelMix, TimeMix

# dense parameter name suffix -> the dimension it is split along (everything else is replicated)
PARTITION_DIM = {
    "att.key.weight": 0, "att.value.weight": 0, "att.receptance.weight": 0, "att.output.weight": 1,
    "att.time_decay": 0, "att.time_first": 0,
    "ffn.key.weight": 0, "ffn.value.weight": 1,
    "emb.weight": 0, "head.weight": 0,
}


def partition_dim(name: str) -> int | None:
    """The dimension along which the dense parameter `name` is split over the tensor-parallel ranks, or None."""
    for suffix, dim in PARTITION_DIM.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    return None


def shard_of(full: torch.Tensor, name: str, rank: int, size: int) -> torch.Tensor:
    """Tensor-parallel rank `rank`'s slice of the dense parameter `name` (a view; the whole tensor if replicated)."""
    dim = partition_dim(name)
    return full if dim is None or size == 1 else full.chunk(size, dim=dim)[rank]


def _config() -> ModelParallelConfig:
    # initialization is ours (the official RWKV rules on the dense shapes, then sliced): megatron must not draw
    return ModelParallelConfig(tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                               use_cpu_initialization=True, perform_initialization=False,
                               gradient_accumulation_fusion=False)


def _dense_state_dict_keys(module: nn.Module) -> None:
    """megatron's layers add an `_extra_state` entry (for Transformer Engine) to state dicts and expect one on load;
    ours must carry exactly the dense model's keys."""
    module._load_state_dict_pre_hooks.clear()


def _mark(param: nn.Parameter, dim: int) -> nn.Parameter:
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, 1
    return param


class ColumnParallel(tensor_parallel.ColumnParallelLinear):
    """nn.Linear(in, out, bias=False)'s signature and return value; the output is this rank's out/T features."""

    get_extra_state, set_extra_state = nn.Module.get_extra_state, nn.Module.set_extra_state

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, config=_config(), init_method=None, bias=bias,
                         gather_output=False, skip_bias_add=False)
        _dense_state_dict_keys(self)
        _mark(self.weight, 0)

    def forward(self, x):
        return super().forward(x)[0]


class RowParallel(tensor_parallel.RowParallelLinear):
    """nn.Linear(in, out, bias=False) over this rank's in/T input features; the output is summed over ranks."""

    get_extra_state, set_extra_state = nn.Module.get_extra_state, nn.Module.set_extra_state

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, config=_config(), init_method=None, bias=bias,
                         input_is_parallel=True, skip_bias_add=False)
        _dense_state_dict_keys(self)
        _mark(self.weight, 1)

    def forward(self, x):
        return super().forward(x)[0]


class VocabEmbedding(tensor_parallel.VocabParallelEmbedding):
    """nn.Embedding(V, D) holding rows [t V/T, (t+1) V/T); the output is whole (summed over ranks)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim, init_method=None, config=_config())
        _mark(self.weight, 0)


class TensorParallelTimeMix(TimeMix):
    """TimeMix on D/T local channels: the same forward, with megatron layers and sliced per-channel parameters."""

    def __init__(self, cfg: RWKVConfig, layer_id: int):
        nn.Module.__init__(self)
        D, local = cfg.n_embd, cfg.n_embd // parallel_state.get_tensor_model_parallel_world_size()
        self.layer_id = layer_id
        self.time_decay = _mark(nn.Parameter(torch.empty(local)), 0)
        self.time_first = _mark(nn.Parameter(torch.empty(local)), 0)
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, D))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, D))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, D))
        self.key = ColumnParallel(D, D)
        self.value = ColumnParallel(D, D)
        self.receptance = ColumnParallel(D, D)
        self.output = RowParallel(D, D)


class TensorParallelChannelMix(ChannelMix):
    def __init__(self, cfg: RWKVConfig, layer_id: int):
        nn.Module.__init__(self)
        D, hidden = cfg.n_embd, cfg.ffn_width
        self.layer_id = layer_id
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, D))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, D))
        self.key = ColumnParallel(D, hidden)
        self.receptance = nn.Linear(D, D, bias=False)
        self.value = RowParallel(hidden, D)


class TensorParallelBlock(Block):
    time_mix, channel_mix = TensorParallelTimeMix, TensorParallelChannelMix


def vocab_parallel_layers():
    """(embedding class, head class) with nn.Embedding's and nn.Linear's signatures, split over the vocabulary."""
    return VocabEmbedding, ColumnParallel


# -- the loss over vocabulary-parallel logits -----------------------------------------------------------------------
class _L2WrapParallel(torch.autograd.Function):
    """L2Wrap (rwkv_dist.train.loss) over logits split along the vocabulary: the position's maximum and its first index are
    found across ranks exactly as torch.max over the whole row would (ties go to the lowest vocabulary index)."""

    @staticmethod
    def forward(ctx, loss, logits, top, index, group):
        ctx.save_for_backward(top, index)
        ctx.shape, ctx.dtype, ctx.group = logits.shape, logits.dtype, group
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        from ..train.loss import L2WRAP_SCALE

        top, index = ctx.saved_tensors
        group = ctx.group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        positions = top.numel()
        best = top.float().clone()
        dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
        owner = torch.where(top.float() == best, rank, size).to(torch.int64)
        dist.all_reduce(owner, op=dist.ReduceOp.MIN, group=group)
        value = torch.where(owner == rank, top * (L2WRAP_SCALE / positions), torch.zeros_like(top))
        g_logits = torch.zeros(ctx.shape, dtype=ctx.dtype, device=top.device).scatter_(-1, index, value)
        return grad_loss, g_logits * grad_loss, None, None, None


def vocab_parallel_loss(logits: torch.Tensor, targets: torch.Tensor, l2wrap: bool):
    """(mean next-token cross-entropy in fp32, what to differentiate) from this rank's vocabulary slice of the logits
    [..., V/T]; equal to rwkv_dist.parallel.common.training_loss on the gathered logits."""
    top, index = logits.detach().max(dim=-1, keepdim=True)  # before the loss: megatron's works on them in place
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets.to(logits.device)).mean()
    if not l2wrap:
        return loss, loss
    return loss, _L2WrapParallel.apply(loss, logits, top, index, parallel_state.get_tensor_model_parallel_group())


@torch.no_grad()
def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """The whole logits [..., V] from every tensor-parallel rank's slice (evaluation only: training never needs them)."""
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
