"""The smoke-test demo: a tiny byte-level RWKV trained in one process on text every Python installation carries.

Later issues replace this with the real pipeline (tokenizer, WebDataset shards, DeepSpeed ZeRO-3 on Ray workers).
"""

from __future__ import annotations

import importlib
import inspect
import time

import torch
import torch.nn.functional as F

from .model import RWKV, RWKVConfig

# Docstrings of a fixed set of standard-library modules: license-clean English prose, no network needed.
_CORPUS_MODULES = ("this", "collections", "itertools", "functools", "json", "re", "string", "textwrap", "heapq",
                   "bisect", "random", "statistics", "fractions", "decimal", "pathlib", "argparse", "logging")


def builtin_text() -> str:
    import contextlib
    import io

    parts = []
    for name in _CORPUS_MODULES:
        with contextlib.redirect_stdout(io.StringIO()) as zen:  # `import this` prints the Zen of Python
            module = importlib.import_module(name)
        text = zen.getvalue() or inspect.getdoc(module) or ""
        parts.append(text)
        parts.extend(inspect.getdoc(obj) or "" for _, obj in sorted(vars(module).items())
                     if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name)
    return "\n\n".join(p for p in parts if p)


@torch.no_grad()
def sample(model: RWKV, prompt: bytes, n: int, temperature: float = 0.8, seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    logits, state = None, None
    for byte in prompt:
        logits, state = model.step(torch.tensor([byte]), state)
    out = bytearray()
    for _ in range(n):
        probs = torch.softmax(logits[0] / temperature, dim=-1)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        logits, state = model.step(torch.tensor([nxt]), state)
    return bytes(out)


def run_demo(steps: int = 300, seed: int = 0, ctx_len: int = 128, batch: int = 16) -> float:
    torch.manual_seed(seed)
    data = torch.frombuffer(bytearray(builtin_text().encode()), dtype=torch.uint8).long()
    print(f"corpus: {len(data):,} bytes of standard-library docstrings; byte-level vocabulary (256)")
    model = RWKV(RWKVConfig(n_layer=2, n_embd=128, vocab_size=256, ctx_len=ctx_len))
    print(f"model: RWKV-4 L2 D128, {sum(p.numel() for p in model.parameters()):,} parameters")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.99), eps=1e-8)
    start, first = time.time(), None
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(data) - ctx_len - 1, (batch,))
        window = torch.stack([data[i : i + ctx_len + 1] for i in idx])
        loss = F.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
        if step % 50 == 0 or step == 1:
            tok_s = step * batch * ctx_len / (time.time() - start)
            print(f"step {step:4d}  loss {loss.item():.3f}  {tok_s:,.0f} tokens/s")
    print(f"loss {first:.3f} -> {loss.item():.3f} in {time.time() - start:.1f} s")
    text = sample(model, b"The ", 200, seed=seed).decode("utf-8", errors="replace")
    print("sample (recurrent mode): The " + text)
    return loss.item()
