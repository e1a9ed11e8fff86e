"""Recurrent-mode decoding speed of rwkv_dist's `Decoder` (and of `RWKV.step`) against the `rwkv` pip package.

    .venv/bin/python bench/decode.py [--n-layer 12 --n-embd 768] [--contexts 16 512 2048] [--tokens 32]

Both run batch 1 in fp32 on the CPU ('cpu fp32' strategy for the pip package), in one process, on a 169M-shaped model
with the paper's initialization; ours as rwkv_dist.model.decode.Decoder (weights packed once for matrix-vector
products) and, as the "before" column, `RWKV.step` after `RWKV.for_decoding()`; theirs after its load-time weight
conversion; all on the same weights. "Decoder GB/s" is the fp32 decoder's effective weight bandwidth (bytes of
weights read per token x tok/s). The bf16 / int8 columns are the same Decoder storing its matrices narrower (fp32
math, csrc/gemv_cpu.cpp), against the pip package in fp32. Each context length is first prefilled (our parallel
mode / their sequence mode), then --tokens tokens are decoded one at a time; the decode rate is what is compared. An
RNN's step costs the same at any context, so every column should be flat.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from rwkv_dist.model import RWKV, RWKVConfig  # noqa: E402
from rwkv_dist.model.decode import Decoder  # noqa: E402

os.environ.setdefault("RWKV_CUDA_ON", "0")
os.environ.setdefault("RWKV_JIT_ON", "1")


def decode_rate(step, first_logits, state, n: int) -> float:
    logits = first_logits
    start = time.perf_counter()
    for _ in range(n):
        token = int(torch.argmax(logits))
        logits, state = step(token, state)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50277)
    parser.add_argument("--contexts", type=int, nargs="+", default=[16, 512, 2048])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    ours = RWKV(RWKVConfig(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab)).eval()
    with torch.no_grad():  # the paper init zeroes some matrices; fill them so every path does real work
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    from rwkv.model import RWKV as PipRWKV

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(ours.state_dict(), f"{tmp}/model.pth")
        theirs = PipRWKV(model=f"{tmp}/model.pth", strategy="cpu fp32", verbose=False)
    fast = Decoder(ours)
    narrow = {w: Decoder(ours, weights=w) for w in ("bf16", "int8")}
    ours.for_decoding()  # every side lays its weights out for decoding once, at load

    def fast_step(token, state):
        logits, state = fast.step(torch.tensor([token]), state)
        return logits[0], state

    def narrow_step(weights):
        def step(token, state):
            logits, state = narrow[weights].step(torch.tensor([token]), state)
            return logits[0], state
        return step

    def our_step(token, state):
        logits, state = ours.step(torch.tensor([token]), state)
        return logits[0], state

    def their_step(token, state):
        return theirs.forward([token], state)

    print(f"RNN decode, batch 1, fp32, L{args.n_layer} D{args.n_embd} V{args.vocab}, {torch.get_num_threads()} threads,"
          f" {fast.weight_bytes() / 1e6:.0f} MB of weights read per token")
    print(f"{'context':>8s}{'Decoder tok/s':>15s}{'RWKV.step tok/s':>17s}{'rwkv pip tok/s':>16s}"
          f"{'Decoder/pip':>13s}{'step/pip':>10s}{'Decoder GB/s':>14s}"
          f"{'bf16 tok/s':>12s}{'bf16/pip':>10s}{'int8 tok/s':>12s}{'int8/pip':>10s}")
    prompt = torch.randint(0, args.vocab, (max(args.contexts),), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for ctx in args.contexts:
            logits, state = ours(prompt[None, :ctx], return_state=True)
            their_logits, their_state = theirs.forward(prompt[:ctx].tolist(), None)
            rates = {"fast": [], "ours": [], "theirs": [], "bf16": [], "int8": []}
            for _ in range(args.rounds):  # alternate, so that machine noise hits all alike; report medians
                rates["fast"].append(decode_rate(fast_step, logits[0, -1], state, args.tokens))
                for weights in narrow:
                    rates[weights].append(decode_rate(narrow_step(weights), logits[0, -1], state, args.tokens))
                rates["ours"].append(decode_rate(our_step, logits[0, -1], state, args.tokens))
                rates["theirs"].append(decode_rate(their_step, their_logits, their_state, args.tokens))
            f, o, t, b, q = (statistics.median(rates[k]) for k in ("fast", "ours", "theirs", "bf16", "int8"))
            print(f"{ctx:8d}{f:15.1f}{o:17.1f}{t:16.1f}{f / t:12.2f}x{o / t:9.2f}x{f * fast.weight_bytes() / 1e9:14.1f}"
                  f"{b:12.1f}{b / t:9.2f}x{q:12.1f}{q / t:9.2f}x", flush=True)


if __name__ == "__main__":
    main()
