"""Run under torchrun with 2 processes: each tensor-parallel layer (TimeMix, ChannelMix, the vocabulary-parallel
embedding, head and loss with L2Wrap) against the dense layer, forward and backward, on random inputs and random
weights. The dense layer runs twice: in float64 (the reference) and in float32 (the float32 noise floor). Rank 0 writes
{layer: {"tp": max error of the tensor-parallel fp32 layer, "dense": max error of the dense fp32 layer}} to argv[1],
errors relative to the largest reference value of each output and gradient."""

import json
import sys

import torch
import torch.distributed as dist

from rwkv_dist.model import RWKVConfig
from rwkv_dist.model.rwkv import ChannelMix, TimeMix
from rwkv_dist.parallel.common import training_loss
from rwkv_dist.parallel.tensor import (TensorParallelChannelMix, TensorParallelTimeMix, gather_vocab, parallel_state,
                                       shard_of, vocab_parallel_layers, vocab_parallel_loss)

dist.init_process_group("gloo")
parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
rank, T = parallel_state.get_tensor_model_parallel_rank(), 2
cfg = RWKVConfig(n_layer=3, n_embd=32, vocab_size=96)
torch.manual_seed(0)  # every rank draws the same dense weights and inputs
B, L = 3, 12


class Head(torch.nn.Module):
    """Embedding -> head -> loss (with L2Wrap), the vocabulary-parallel pieces, as one layer."""

    def __init__(self, embedding, head):
        super().__init__()
        self.emb, self.head = embedding(cfg.vocab_size, cfg.n_embd), head(cfg.n_embd, cfg.vocab_size, bias=False)


def error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def compare(prefix, dense, parallel, run_dense, run_parallel):
    """prefix: the layer's place in the model (att., ffn., or none), which decides how each parameter is split."""
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.5)
        for n, p in dense.named_parameters():
            if "time_mix" in n:
                p.uniform_(0, 1)
    ref = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    parallel.load_state_dict({k: shard_of(v, prefix + k, rank, T).clone() for k, v in ref.items()}, strict=True)
    result = {}
    outs = {}
    for kind, module, dtype in (("ref", dense, torch.float64), ("dense", dense, torch.float32)):
        module.load_state_dict({k: v.to(dtype) for k, v in ref.items()})
        module.to(dtype).zero_grad()
        out = run_dense(module, dtype)
        out.backward(torch.ones_like(out) if out.dim() else None)
        outs[kind] = (out.detach(), {n: p.grad.detach().clone() for n, p in module.named_parameters()})
    out = run_parallel(parallel)
    out.backward(torch.ones_like(out) if out.dim() else None)
    outs["tp"] = (out.detach(), {n: p.grad for n, p in parallel.named_parameters()})
    ref_out, ref_grads = outs["ref"]
    for kind in ("dense", "tp"):
        got_out, got_grads = outs[kind]
        errs = [error(got_out if kind == "dense" or got_out.shape == ref_out.shape else gather_vocab(got_out), ref_out)]
        for n, g in got_grads.items():
            want = shard_of(ref_grads[n], prefix + n, rank, T) if kind == "tp" else ref_grads[n]
            errs.append(error(g, want))
        result[kind] = max(errs)
    return result


x = torch.randn(B, L, cfg.n_embd)
tokens = torch.randint(0, cfg.vocab_size, (B, L))
targets = torch.randint(0, cfg.vocab_size, (B, L))
report = {
    "time_mix": compare("att.", TimeMix(cfg, 1), TensorParallelTimeMix(cfg, 1),
                        lambda m, dt: m(x.to(dt), None, None)[0], lambda m: m(x, None, None)[0]),
    "channel_mix": compare("ffn.", ChannelMix(cfg, 1), TensorParallelChannelMix(cfg, 1),
                           lambda m, dt: m(x.to(dt), None)[0], lambda m: m(x, None)[0]),
}
loss_cfg = type("LossConfig", (), {"l2wrap": True})()
report["embedding_head_loss"] = compare(
    "", Head(torch.nn.Embedding, torch.nn.Linear), Head(*vocab_parallel_layers()),
    lambda m, dt: training_loss(loss_cfg, m.head(m.emb(tokens)).to(dt), targets)[1],
    lambda m: vocab_parallel_loss(m.head(m.emb(tokens)), targets, l2wrap=True)[1])
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)
dist.destroy_process_group()
