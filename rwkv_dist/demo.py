"""The demo: the embedded corpus through the real data path into a small RWKV, trained in one process.

    corpus (builtin:stdlib) -> sentencepiece tokenizer -> WebDataset shards + manifest -> TokenLoader -> RWKV -> sample

Later work replaces the single-process loop with DeepSpeed ZeRO-3 on Ray workers.
"""

from __future__ import annotations

import math
import time
from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import BUILTIN, CorpusStats, TokenLoader, Tokenizer, expand_inputs, read_documents, train_tokenizer
from .data import validation_batches, write_shards
from .model import RWKV, RWKVConfig


def prepare_data(out: Path, vocab_size: int = 2048) -> tuple[Tokenizer, str]:
    """Tokenizer and shards of the embedded corpus under `out` (built once, reused after)."""
    files = expand_inputs([BUILTIN])
    if not (out / "tokenizer" / "tokenizer.model").exists():
        print(f"training a {vocab_size}-token sentencepiece tokenizer on {len(files)} standard-library files ...")
        train_tokenizer(read_documents(files), out / "tokenizer", vocab_size=vocab_size)
    tokenizer = Tokenizer(out / "tokenizer")
    if not (out / "data" / "manifest.json").exists():
        print("writing WebDataset shards ...")
        stats = CorpusStats()
        write_shards(read_documents(files, stats=stats), tokenizer, out / "data", stats, shard_tokens=100_000,
                     val_fraction=0.03)
    return tokenizer, str(out / "data")


@torch.no_grad()
def sample(model: RWKV, tokenizer: Tokenizer, prompt: str, n: int, temperature: float = 0.8, top_p: float = 0.9,
           seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    logits, state = None, None
    for token in tokenizer.encode([prompt])[0]:
        logits, state = model.step(torch.tensor([token]), state)
    out = []
    for _ in range(n):
        probs = torch.softmax(logits[0].float() / temperature, dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < top_p  # nucleus: smallest set with mass >= top_p
        token = int(order[keep][torch.multinomial(sorted_probs[keep], 1, generator=gen)])
        out.append(token)
        logits, state = model.step(torch.tensor([token]), state)
    return tokenizer.decode(out)


def evaluate(model: RWKV, location: str, ctx_len: int, batches: int = 8) -> float:
    losses = []
    with torch.no_grad():
        for x, y in validation_batches(location, ctx_len, batch_size=4, max_batches=batches):
            losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    return sum(losses) / max(len(losses), 1)


def run_demo(out: str | Path = "runs/demo", steps: int = 300, seed: int = 0, ctx_len: int = 128,
             batch_size: int = 8) -> tuple[float, float, float]:
    """Returns (first training loss, mean of the last 20 training losses, validation loss)."""
    torch.manual_seed(seed)
    out = Path(out)
    tokenizer, location = prepare_data(out)
    loader = TokenLoader(location, ctx_len=ctx_len, batch_size=batch_size, seed=seed)
    model = RWKV(RWKVConfig(n_layer=4, n_embd=128, vocab_size=tokenizer.vocab_size, ctx_len=ctx_len))
    print(f"model: RWKV-4 L4 D128 V{tokenizer.vocab_size}, {sum(p.numel() for p in model.parameters()):,} parameters")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.99), eps=1e-8)
    start, first, recent = time.time(), None, deque(maxlen=20)
    for step, batch in enumerate(loader, 1):
        loss = F.cross_entropy(model(batch.inputs).flatten(0, 1), batch.targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        recent.append(loss.item())
        if step % 50 == 0 or step == 1:
            tok_s = step * batch_size * ctx_len / (time.time() - start)
            print(f"step {step:4d}  loss {loss.item():.3f}  {tok_s:,.0f} tokens/s  epoch {batch.epochs[location]}")
        if step == steps:
            break
    model.eval()
    val = evaluate(model, location, ctx_len)
    last = sum(recent) / len(recent)
    print(f"train loss {first:.3f} -> {last:.3f} (mean of the last {len(recent)}) in {time.time() - start:.1f} s; "
          f"val loss {val:.3f} (perplexity {math.exp(val):.1f}; uniform would be {math.log(tokenizer.vocab_size):.2f})")
    print("sample (recurrent mode):\ndef " + sample(model.for_decoding(), tokenizer, "def ", 120, seed=seed))
    return first, last, val
