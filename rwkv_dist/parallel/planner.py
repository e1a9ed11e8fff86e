"""`rwkv-dist plan`: what each 3D layout of a run costs on a GPU cluster, before anyone rents it.

For every layout (P pipeline stages x D ZeRO replicas x T tensor ranks, micro-batch, activation checkpointing,
offload) the planner gives memory per GPU, communication per step per link and a roofline step time, and recommends
the fastest layout that fits. It counts what the engine builds, with the engine's own rules: the stage split
(`balanced_stage_layers`), the tensor split (`parallel.tensor.partition_dim`), ZeRO-3's padding and persistence
threshold, the parameter-group bytes DeepSpeed keeps, and the trainer's FLOPs per token (`flops_per_token_fwd`,
the MFU definition of the training log).

Assumptions (all stated in the output's `assumptions`; none is measured on the cluster):
- bf16 training. Bytes per parameter held by a rank: ZeRO-3 (DeepSpeed's own accounting, its estimator's 18):
  2 bf16 parameter shard + 4 fp32 gradient partition + 4 fp32 master + 8 Adam moments; in fp32 4 + 4 + 4 + 8.
  ZeRO-2: the bf16 parameters whole (2) plus 16 partitioned. Plus the gathered-layer buffer: 4 bytes x the largest
  layer (DeepSpeed's estimator). Offload moves the partitioned fp32 state (and with `all` the parameters) to the CPU.
- Activations per token and layer in bf16: 16 D replicated + (6 D + 3 F) / T split values (RWKV-4's saved tensors:
  layer norms, token shifts and mixes; k, v, r, WKV and gating; ChannelMix's F-wide hidden), plus 3 D / T fp32 for
  WKV. With
  activation checkpointing a layer keeps its 2 D input and one layer is live during its recompute. The last stage
  adds its logits (bf16, their fp32 copy and gradient). 1F1B keeps min(P - s, m) micro-batches in flight on stage s.
  10% of the GPU's memory is left to the allocator and the CUDA context.
- Time: matmuls at 70% of the datasheet bf16 peak (large GEMMs on A100/H100); elementwise work as three passes
  over the activations at HBM bandwidth; ring all-reduce / all-gather / reduce-scatter at the link's per-GPU
  bandwidth (NVLink inside a node, the network between nodes), TP on the critical path, pipeline sends overlapped
  except one per micro-batch, data-parallel traffic overlapped with compute (only what exceeds it is exposed), and
  the 1F1B bubble (m + P - 1) / m.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from itertools import product

import torch

from ..config import RunConfig
from ..errors import ConfigError
from ..model import RWKV, RWKVConfig
from .pipeline import balanced_stage_layers
from .tensor import partition_dim

GB = 1e9


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gb: float
    bf16_tflops: float
    hbm_gb_s: float
    nvlink_gb_s: float  # per GPU, one direction
    network_gb_s: float  # per GPU between nodes (one NIC per GPU)


GPUS = {
    "A100-40G": GPUSpec("A100 40GB SXM", 40, 312, 1555, 300, 25),  # HDR InfiniBand 200 Gb/s per GPU
    "A100-80G": GPUSpec("A100 80GB SXM", 80, 312, 2039, 300, 25),
    "H100": GPUSpec("H100 SXM", 80, 989, 3350, 450, 50),  # NDR 400 Gb/s per GPU
    "H200": GPUSpec("H200 SXM", 141, 989, 4800, 450, 50),
}
MATMUL_EFFICIENCY = 0.7
PCIE_GB_S = 25.0
MEMORY_RESERVE = 0.10
BYTES_PER_PARAM = {  # (parameter shard, gradient, fp32 master, optimizer moments) per parameter a rank holds
    "bf16": (2, 4, 4, 8),
    "fp32": (4, 4, 4, 8),
}


@dataclass
class Layout:
    pipeline: int
    tensor: int
    data: int
    micro_batch: int
    grad_accum: int
    activation_checkpointing: bool
    offload: str  # none | optimizer | all
    zero: int = 3


@dataclass
class Estimate:
    layout: Layout
    memory_gb: dict[str, float]
    comm_gb: dict[str, float]  # per GPU per step, by link: nvlink, network
    time_s: dict[str, float]
    step_s: float
    tokens_per_s: float
    mfu: float
    fits: bool
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict:
        L = self.layout
        return {"P": L.pipeline, "T": L.tensor, "D": L.data, "micro": L.micro_batch, "accum": L.grad_accum,
                "ckpt": "yes" if L.activation_checkpointing else "no", "offload": L.offload,
                **{f"{k} GB": round(v, 1) for k, v in self.memory_gb.items()},
                "fits": "yes" if self.fits else "NO",
                **{f"{k} GB/step": round(v, 1) for k, v in self.comm_gb.items()},
                "step s": round(self.step_s, 3), "tokens/s": round(self.tokens_per_s), "MFU": round(self.mfu, 3)}


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpus_per_node: int
    gpu: GPUSpec
    memory_gb: float


# -- what each rank holds, counted on the meta model with the engine's own rules -------------------------------------
@dataclass(frozen=True)
class RankShare:
    """Parameters of the busiest (stage, tensor rank): elements per parameter, and matmul elements (for FLOPs)."""

    elements: tuple[int, ...]
    matmul_elements: int
    largest_layer: int
    has_head: bool


@functools.lru_cache(maxsize=None)
def rank_share(model: RWKVConfig, pipeline: int, tensor: int) -> RankShare:
    with torch.device("meta"):
        dense = RWKV(model, init=False)
    sizes = balanced_stage_layers(model, pipeline)
    shares = []
    for stage in range(pipeline):
        first, last = sum(sizes[:stage]), sum(sizes[: stage + 1])
        elements, matmul, layers = [], 0, {}
        for name, p in dense.named_parameters():
            top = name.split(".")[0]
            if top == "blocks" and not first <= int(name.split(".")[1]) < last:
                continue
            if (top == "emb" and stage != 0) or (top in ("ln_out", "head") and stage != pipeline - 1):
                continue
            n = p.numel() // (tensor if partition_dim(name) is not None else 1)
            elements.append(n)
            if p.dim() == 2 and top != "emb":  # the embedding is a lookup
                matmul += n
            module = name.rsplit(".", 1)[0]
            layers[module] = layers.get(module, 0) + n
        shares.append(RankShare(tuple(elements), matmul, max(layers.values()), stage == pipeline - 1))
    return max(shares, key=lambda s: (s.matmul_elements, sum(s.elements)))


def held_elements(share: RankShare, data: int, persistence_threshold: int) -> int:
    """Elements a rank stores under ZeRO-3: a ceil(n / D) shard of each parameter; small ones whole (persistent)."""
    return sum(n if n <= persistence_threshold else math.ceil(n / data) for n in share.elements)


def model_state_bytes(cfg: RunConfig, pipeline: int, tensor: int, data: int) -> int:
    """Parameter + master + optimizer bytes of one ZeRO-3 rank (gradients excluded): what the trainer's model_state()
    measures per rank (ranks/rank_R.json), used by the tests to check the planner against the engine."""
    share = rank_share(cfg.model, pipeline, tensor)
    param, _, master, moments = BYTES_PER_PARAM[cfg.precision if cfg.precision != "auto" else "bf16"]
    return held_elements(share, data, cfg.parallel.persistence_threshold) * (param + master + moments)


# -- one layout -------------------------------------------------------------------------------------------------------
def estimate(cfg: RunConfig, cluster: Cluster, layout: Layout) -> Estimate:
    m, L = cfg.model, layout
    P, T, D, B, A = L.pipeline, L.tensor, L.data, L.micro_batch, L.grad_accum
    share = rank_share(m, P, T)
    precision = "fp32" if cfg.precision == "fp32" else "bf16"
    param_b, grad_b, master_b, moment_b = BYTES_PER_PARAM[precision]
    total = sum(share.elements)
    if L.zero == 3:
        held = held_elements(share, D, cfg.parallel.persistence_threshold)
        params = held * param_b + 4 * share.largest_layer  # shard + the gathered-layer buffer
    else:
        held = math.ceil(total / D)
        params = total * param_b
    partitioned = held * (grad_b + master_b + moment_b)
    offloaded = partitioned if L.offload in ("optimizer", "all") else 0
    if L.offload == "all" and L.zero == 3:
        offloaded += held * param_b
        params -= held * param_b
    memory = {"weights": params / GB,
              "grads": (held * grad_b if L.offload == "none" else 0) / GB,
              "optimizer": (held * (master_b + moment_b) if L.offload == "none" else 0) / GB}

    # activations of the busiest stage (stage 0 keeps the most micro-batches in flight under 1F1B)
    ctx, width = m.ctx_len, m.n_embd
    layers = max(balanced_stage_layers(m, P))
    act_b = 2 if precision == "bf16" else 4
    # replicated: layer norms, token shifts, the five mixes, ChannelMix's gate path, residuals (~16 D); split: k, v,
    # r, WKV out, gate, product (6 D) and ChannelMix's key, relu, square (3 F); WKV's fp32 inputs and output (3 D)
    per_token_layer = act_b * (16 * width + (6 * width + 3 * m.ffn_width) / T) + 4 * 3 * width / T
    in_flight = min(P, A)
    tokens = B * ctx
    if L.activation_checkpointing:
        stored = tokens * layers * 2 * width * act_b * in_flight + tokens * per_token_layer
    else:
        stored = tokens * layers * per_token_layer * in_flight
    logits = tokens * (m.vocab_size / T) * (act_b + 4 + 4) if share.has_head else 0
    memory["activations"] = (stored + logits) / GB
    memory["total"] = sum(memory.values())
    fits = memory["total"] <= cluster.memory_gb * (1 - MEMORY_RESERVE)

    # time per step on one GPU
    gpu = cluster.gpu
    tokens_replica = cfg.schedule.global_batch_size * ctx / D  # per data-parallel replica per step
    passes = 4 if L.activation_checkpointing else 3
    compute = passes * 2 * share.matmul_elements * tokens_replica / (gpu.bf16_tflops * 1e12 * MATMUL_EFFICIENCY)
    elementwise = 3 * (passes / 3) * tokens_replica * layers * per_token_layer / (gpu.hbm_gb_s * GB)
    node = cluster.gpus_per_node
    act_bytes = tokens * width * act_b  # one micro-batch's hidden states
    ring = 2 * (T - 1) / T
    tp_calls = layers * (6 + (2 if L.activation_checkpointing else 0)) + 2  # + embedding and head
    tp_bytes = A * tp_calls * ring * act_bytes if T > 1 else 0.0
    dp_spans_nodes = D * T > node
    pp_spans_nodes = P > 1 and D * T * P > node
    if L.zero == 3:
        gathers = 3 if L.activation_checkpointing else 2
        dp_bytes = A * (gathers + 1) * held * D * 2 * (D - 1) / D if D > 1 else 0.0
    else:
        dp_bytes = (A + 1) * total * 2 * (D - 1) / D if D > 1 else 0.0
    pp_bytes = 2 * A * act_bytes if P > 1 else 0.0
    links = {"nvlink": 0.0, "network": 0.0}
    links["nvlink"] += tp_bytes
    links["network" if dp_spans_nodes else "nvlink"] += dp_bytes
    links["network" if pp_spans_nodes else "nvlink"] += pp_bytes
    bw = {"nvlink": gpu.nvlink_gb_s * GB, "network": gpu.network_gb_s * GB}
    tp_time = tp_bytes / bw["nvlink"]
    dp_time = dp_bytes / bw["network" if dp_spans_nodes else "nvlink"]
    pp_time = (pp_bytes / A if A else 0) / bw["network" if pp_spans_nodes else "nvlink"]
    offload_time = 0.0
    if L.offload != "none":  # gradients out, parameters back over PCIe, and the CPU's Adam
        offload_time = held * (grad_b + param_b) / (PCIE_GB_S * GB) + held * 16 * 3 / (50 * GB)
        if L.offload == "all":
            offload_time += A * (passes - 1) * held * param_b * D / (PCIE_GB_S * GB)
    busy = compute + elementwise + tp_time + pp_time
    bubble = (A + P - 1) / A
    step = bubble * busy + max(0.0, dp_time - compute) + offload_time
    tokens_per_s = cfg.schedule.global_batch_size * ctx / step
    mfu = 3 * m.flops_per_token_fwd() * tokens_per_s / (cluster.gpus * gpu.bf16_tflops * 1e12)
    times = {"compute": compute, "elementwise": elementwise, "tensor": tp_time, "pipeline": pp_time,
             "data (total)": dp_time, "offload": offload_time, "bubble": (bubble - 1) * busy}
    return Estimate(layout, memory, {k: v / GB for k, v in links.items()}, times, step, tokens_per_s, mfu, fits)


# -- every layout -----------------------------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_request(cfg: RunConfig, cluster: Cluster, tensor: int | None, pipeline: int | None) -> None:
    m = cfg.model
    if cluster.gpus % cluster.gpus_per_node and cluster.gpus > cluster.gpus_per_node:
        raise ConfigError(f"--gpus-per-node ({cluster.gpus_per_node}) does not divide --gpus ({cluster.gpus})")
    if tensor is not None:
        if cluster.gpus % tensor:
            raise ConfigError(f"--tensor {tensor} does not divide --gpus {cluster.gpus}")
        if tensor > cluster.gpus_per_node:
            raise ConfigError(f"--tensor {tensor} spans nodes (--gpus-per-node {cluster.gpus_per_node}): a "
                              f"tensor-parallel group all-reduces every layer and must sit inside one node")
        for name, value in (("n_embd", m.n_embd), ("ffn_width", m.ffn_width), ("vocab_size", m.vocab_size)):
            if value % tensor:
                raise ConfigError(f"--tensor {tensor} does not divide model.{name} ({value})")
    if pipeline is not None:
        if cluster.gpus % pipeline:
            raise ConfigError(f"--pipeline {pipeline} does not divide --gpus {cluster.gpus}")
        if pipeline > m.n_layer:
            raise ConfigError(f"--pipeline {pipeline} exceeds model.n_layer ({m.n_layer}): every stage needs a block")
    if tensor is not None and pipeline is not None and cluster.gpus % (tensor * pipeline):
        raise ConfigError(f"--tensor {tensor} x --pipeline {pipeline} does not divide --gpus {cluster.gpus}")


def layouts(cfg: RunConfig, cluster: Cluster, tensor: int | None = None, pipeline: int | None = None,
            zero: int = 3) -> list[Layout]:
    m, G = cfg.model, cfg.schedule.global_batch_size
    found = []
    for T, P in product(_divisors(cluster.gpus), _divisors(cluster.gpus)):
        if (tensor is not None and T != tensor) or (pipeline is not None and P != pipeline):
            continue
        if T > cluster.gpus_per_node or P > m.n_layer or cluster.gpus % (T * P):
            continue
        if any(v % T for v in (m.n_embd, m.ffn_width, m.vocab_size)):
            continue
        D = cluster.gpus // (T * P)
        if G % D:
            continue
        for B in _divisors(G // D):
            A = G // (D * B)
            if P > 1 and A < P:
                continue
            for ac, offload in product((False, True), ("none", "optimizer", "all")):
                if zero == 2 and offload == "all":
                    continue
                found.append(Layout(P, T, D, B, A, ac, offload, zero))
    return found


def plan(cfg: RunConfig, cluster: Cluster, tensor: int | None = None, pipeline: int | None = None,
         zero: int = 3) -> tuple[list[Estimate], Estimate]:
    """(every layout's estimate, fastest first, the recommended one); ConfigError if none fits."""
    check_request(cfg, cluster, tensor, pipeline)
    estimates = sorted((estimate(cfg, cluster, L) for L in layouts(cfg, cluster, tensor, pipeline, zero)),
                       key=lambda e: (not e.fits, -e.tokens_per_s))
    fitting = [e for e in estimates if e.fits]
    if not fitting:
        smallest = min(estimates, key=lambda e: e.memory_gb["total"], default=None)
        need = f"; the smallest needs {smallest.memory_gb['total']:.1f} GB per GPU" if smallest else ""
        raise ConfigError(f"no layout of {cluster.gpus} x {cluster.gpu.name} ({cluster.memory_gb:g} GB) fits "
                          f"{cfg.model.num_params() / 1e9:.2f}B parameters at micro-batches of ctx "
                          f"{cfg.model.ctx_len}{need}")
    return estimates, fitting[0]


def assumptions() -> dict:
    return {"matmul_efficiency": MATMUL_EFFICIENCY, "memory_reserve": MEMORY_RESERVE, "pcie_gb_s": PCIE_GB_S,
            "bytes_per_param (shard, grad, master, moments)": BYTES_PER_PARAM,
            "gpus": {k: asdict(v) for k, v in GPUS.items()}}


def print_plan(cfg: RunConfig, cluster: Cluster, estimates: list[Estimate], best: Estimate, rows: int = 12) -> None:
    from rich.console import Console
    from rich.table import Table

    m = cfg.model
    title = (f"{m.num_params() / 1e9:.2f}B RWKV-4 (L{m.n_layer} D{m.n_embd}, ctx {m.ctx_len}, "
             f"{cfg.schedule.global_batch_size} sequences/step) on {cluster.gpus} x {cluster.gpu.name} "
             f"({cluster.memory_gb:g} GB, {cluster.gpus_per_node}/node): {sum(e.fits for e in estimates)} of "
             f"{len(estimates)} layouts fit; the fastest {min(rows, len(estimates))}")
    table = Table(title=title)
    shown = estimates[:rows]
    for key in shown[0].row():
        table.add_column(key, justify="right")
    for e in shown:
        table.add_row(*(str(v) for v in e.row().values()), style="bold" if e is best else None)
    Console(width=250).print(table)
    L = best.layout
    print(f"recommended: parallel.pipeline_stages={L.pipeline} parallel.tensor={L.tensor} (data-parallel {L.data}), "
          f"schedule.micro_batch_size={L.micro_batch} schedule.grad_accum={L.grad_accum}, activation_checkpointing="
          f"{str(L.activation_checkpointing).lower()}, offload {L.offload}: {best.tokens_per_s:,.0f} tokens/s, MFU "
          f"{best.mfu:.2f}, {best.memory_gb['total']:.1f} GB per GPU")
