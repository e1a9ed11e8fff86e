"""Using a trained model: sampling in recurrent mode and validation loss in parallel mode.

A model comes from a training checkpoint (a step folder or a run folder: the newest committed step, with the
tokenizer saved beside it) or from a BlinkDL .pth / .safetensors plus --tokenizer.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .data import Tokenizer, validation_batches
from .data.shards import check_same_tokenizer, load_manifest
from .errors import CheckpointError, DataError
from .model import RWKV, RWKVState
from .model.decode import Decoder
from .model.state_dict import load_rwkv, read_state_dict
from .train.loss import token_cross_entropy


def load_model(path: str | Path, tokenizer: str | Path | None = None) -> tuple[RWKV, Tokenizer | None]:
    """(fp32 model in eval mode, its tokenizer if known)."""
    path = Path(path)
    if path.is_file():
        model = load_rwkv(read_state_dict(path), str(path))
    else:
        from .train.weights import checkpoint_weights

        sd, cfg, folder = checkpoint_weights(path)
        model = load_rwkv(sd, str(folder))
        model.cfg = cfg.model  # same shapes; keeps the trained ctx_len
        tokenizer = tokenizer or folder / "tokenizer.model"
    tok = Tokenizer(tokenizer) if tokenizer is not None else None
    if tok is not None and tok.vocab_size > model.cfg.vocab_size:
        raise CheckpointError(f"{tokenizer}: {tok.vocab_size} tokens, more than the model's {model.cfg.vocab_size}")
    return model.eval(), tok


@torch.no_grad()
def sample(model: RWKV, tokenizer: Tokenizer, prompt: str, n: int, temperature: float = 0.8, top_p: float = 0.9,
           seed: int = 0, prefill_len: int = 1024) -> str:
    """Continue `prompt` by `n` tokens: nucleus sampling, one recurrent step per token. The prompt, of any length,
    is read in parallel mode in segments of prefill_len tokens carrying the state (constant memory)."""
    return sample_many(model, tokenizer, prompt, n, 1, temperature, top_p, seed, prefill_len)[0]


@torch.no_grad()
def sample_many(model: RWKV, tokenizer: Tokenizer, prompt: str, n: int, num_samples: int, temperature: float = 0.8,
                top_p: float = 0.9, seed: int = 0, prefill_len: int = 1024, weights: str = "fp32") -> list[str]:
    """`num_samples` continuations of `prompt`, decoded together as one batch (one weight read per token for all).
    Sample i draws from its own generator seeded `seed + i`, so it is the text `sample(..., seed=seed + i)` gives
    alone. The prompt is read once and its state copied to every sample; decoding runs on rwkv_dist.model.decode's
    Decoder (the weights packed for matrix-vector products, stored as `weights`: fp32, bf16 or int8)."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(num_samples)]
    ids = tokenizer.encode([prompt])[0] or [tokenizer.eod_id]  # an empty prompt starts a new document
    state = None
    for start in range(0, len(ids), prefill_len):
        logits, state = model(torch.tensor([ids[start:start + prefill_len]]), state, return_state=True)
    logits = logits[:, -1].expand(num_samples, -1)
    state = RWKVState(*(s.expand(-1, num_samples, -1).contiguous() for s in state))
    step = Decoder(model, weights).step
    out = [[] for _ in range(num_samples)]
    for _ in range(n):
        tokens = [next_token(row, temperature, top_p, gen) for row, gen in zip(logits, gens)]
        for row, token in zip(out, tokens):
            row.append(token)
        logits, state = step(torch.tensor(tokens), state)
    return [tokenizer.decode(row) for row in out]


def next_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One nucleus-sampled token from logits [V]: the smallest set of tokens with probability mass >= top_p."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_probs, 0) - sorted_probs < top_p
    return int(order[keep][torch.multinomial(sorted_probs[keep], 1, generator=gen)])


@torch.no_grad()
def evaluate(model: RWKV, location: str, ctx_len: int, batch_size: int = 4, max_batches: int | None = None,
             segment_len: int = 1024) -> tuple[float, int]:
    """(mean token loss over the val split of the dataset at `location`, tokens scored). Each window runs in segments
    of segment_len tokens that carry the model state: the loss of the whole window, in the memory of one segment, so
    any ctx_len fits."""
    total, count = 0.0, 0
    for x, y in validation_batches(location, ctx_len, batch_size=batch_size, max_batches=max_batches):
        state = None
        for start in range(0, ctx_len, segment_len):
            piece = slice(start, start + segment_len)
            logits, state = model(x[:, piece], state, return_state=True)
            total += token_cross_entropy(logits, y[:, piece], reduction="sum").item()
        count += y.numel()
    if count == 0:
        raise DataError(f"{location}: the val split has fewer than {ctx_len + 1} tokens (nothing to score)")
    return total / count, count


def check_eval_data(location: str, tokenizer: Tokenizer | None) -> None:
    manifest = load_manifest(location)
    if not manifest.shards("val"):
        raise DataError(f"{location}: no val split (make shards with --val-fraction)")
    if tokenizer is not None:
        check_same_tokenizer(manifest, tokenizer.sha256, location, f"the model's tokenizer ({tokenizer.path})")


def perplexity(loss: float) -> float:
    return math.exp(loss)
