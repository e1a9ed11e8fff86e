"""The fast recurrent decoder (rwkv_dist.model.decode.Decoder) against RWKV.step and against the model in float64,
and batched sampling (`generate --num-samples`) against separate 1-sample runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_dist.model import RWKVConfig, RWKVState
from rwkv_dist.model.decode import Decoder

from helpers import random_model

CFG = RWKVConfig(n_layer=3, n_embd=64, vocab_size=300)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def assert_close(got, want, tol: float) -> None:
    logits, state = got
    want_logits, want_state = want
    assert rel(logits, want_logits) < tol
    for name, s, w in zip(RWKVState._fields, state, want_state):
        finite = w > -1e30  # att_p starts at EMPTY_EXPONENT (-1e38): compare it where it is a real exponent
        assert torch.equal(s <= -1e30, ~finite), name
        assert rel(s[finite], w[finite]) < tol, name


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("prefill", [0, 17])
def test_fast_step_equals_rwkv_step_and_float64(batch, prefill):
    """40 steps from a fresh state or one prefilled in parallel mode: logits and every state tensor equal RWKV.step
    (fp32) to 1e-5 and the float64 model's step to 5e-5 relative, at batch 1 and 4; the given state is not modified."""
    model = random_model(**CFG.model_dump())
    exact = random_model(**CFG.model_dump()).double()
    fast = Decoder(model)
    gen = torch.Generator().manual_seed(batch * 100 + prefill)
    tokens = torch.randint(0, CFG.vocab_size, (batch, prefill + 40), generator=gen)
    with torch.no_grad():
        ref_state = fast_state = None
        exact_state = RWKVState(*(s.double() for s in RWKVState.fresh(CFG, batch)))  # fresh() is fp32
        if prefill:
            _, ref_state = model(tokens[:, :prefill], return_state=True)
            fast_state = RWKVState(*(s.clone() for s in ref_state))
            _, exact_state = exact(tokens[:, :prefill], return_state=True)
            exact_state = RWKVState(*(s.double() for s in exact_state))
        for t in range(prefill, prefill + 40):
            before = None if fast_state is None else [s.clone() for s in fast_state]
            got = fast.step(tokens[:, t], fast_state)
            if before is not None:
                assert all(torch.equal(a, b) for a, b in zip(before, fast_state))
            ref = model.step(tokens[:, t], ref_state)
            want = exact.step(tokens[:, t], exact_state)
            assert got[0].dtype == torch.float32 and got[0].shape == (batch, CFG.vocab_size)
            assert_close(got, ref, 1e-5)
            assert_close(got, want, 5e-5)  # float64: fp32 rounding accumulated over up to 57 tokens
            # RWKV.step keeps the token-shift inputs in fp32 (x.float()): back to float64 for the next step
            fast_state, ref_state, exact_state = got[1], ref[1], RWKVState(*(s.double() for s in want[1]))


def test_batched_fast_step_rows_equal_batch_1_steps():
    """Each row of a batch-3 step is the batch-1 step of that row (different tokens, different states)."""
    model = random_model(**CFG.model_dump())
    fast = Decoder(model)
    tokens = torch.randint(0, CFG.vocab_size, (3, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, state = model(tokens[:, :8], return_state=True)
        rows = [RWKVState(*(s[:, i:i + 1].clone() for s in state)) for i in range(3)]
        for t in range(8, 12):
            logits, state = fast.step(tokens[:, t], state)
            for i in range(3):
                row_logits, rows[i] = fast.step(tokens[i, t:t + 1], rows[i])
                assert rel(logits[i:i + 1], row_logits) < 1e-5
                assert all(rel(s[:, i:i + 1], r) < 1e-5 for s, r in zip(state, rows[i]))


def test_decoder_refuses_a_wrong_batch_and_tokens():
    from rwkv_dist.errors import ShapeError

    fast = Decoder(random_model(**CFG.model_dump()))
    with pytest.raises(ShapeError):
        fast.step(torch.tensor([1, 2]), RWKVState.fresh(CFG, 1))
    with pytest.raises(ShapeError):
        fast.step(torch.tensor([[1]]))


@pytest.fixture(scope="module")
def tok_model(data, tmp_path_factory):
    from rwkv_dist.data import Tokenizer

    tok = Tokenizer(Path(data).parent / "tokenizer")
    model = random_model(n_layer=2, n_embd=32, vocab_size=tok.vocab_size)
    path = tmp_path_factory.mktemp("decode") / "model.pth"
    torch.save(model.state_dict(), path)
    return tok, model, path


def test_batched_samples_equal_separate_runs_with_seed_plus_i(tok_model):
    """sample_many(..., num_samples=4, seed=s): sample i is sample(..., seed=s + i) run alone."""
    from rwkv_dist.inference import sample, sample_many

    tok, model, _ = tok_model
    many = sample_many(model, tok, "def main():", 24, 4, temperature=1.0, top_p=0.95, seed=7)
    alone = [sample(model, tok, "def main():", 24, temperature=1.0, top_p=0.95, seed=7 + i) for i in range(4)]
    assert many == alone and len(set(many)) > 1


def test_generate_num_samples_prints_the_separate_runs(tok_model):
    """`rwkv-dist generate --num-samples 3 --seed 5` prints, per sample, what `--seed 5+i` prints alone."""
    tok, _, path = tok_model

    def generate(*extra):
        done = subprocess.run([sys.executable, "-m", "rwkv_dist.cli", "generate", str(path), "--tokenizer",
                               str(tok.path), "--prompt", "import ", "--max-tokens", "12", *extra],
                              capture_output=True, text=True, check=True)
        return done.stdout

    batched = generate("--num-samples", "3", "--seed", "5")
    parts = re.split(r"^--- sample (\d+) \(seed (\d+)\) ---\n", batched, flags=re.M)
    assert parts[0] == "" and parts[1::3] == ["0", "1", "2"] and parts[2::3] == ["5", "6", "7"]
    assert parts[3::3] == [generate("--seed", str(5 + i)) for i in range(3)]
    assert generate("--weights", "int8").startswith("import ")


def stored_weights(model, weights: str):
    """The model with every matrix the Decoder narrows (blocks' linears, head; not the embedding) replaced by what
    `weights` keeps of it: bf16 rounding, or int8 with one scale per output row (amax / 127, round to nearest)."""
    rounded = random_model(**CFG.model_dump())
    rounded.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.dim() != 2 or name.startswith("emb"):
                continue
            if weights == "bf16":
                p.copy_(p.bfloat16().float())
            else:
                scale = p.abs().amax(dim=1, keepdim=True) / 127
                p.copy_(torch.round(p / scale).clamp(-127, 127) * scale)
    return rounded


@pytest.mark.parametrize("weights", ["bf16", "int8"])
@pytest.mark.parametrize("batch", [1, 3])
def test_narrow_weights_decode_as_fp32_decode_of_the_stored_weights(weights, batch):
    """Decoder(model, weights="bf16"/"int8") steps as the fp32 Decoder of the model whose matrices are rounded the
    same way (1e-5 relative over 12 steps: only the kernel's order of sums differs), and stays near the unrounded
    model (bf16 2%, int8 6% of the largest logit)."""
    model = random_model(**CFG.model_dump())
    narrow, exact = Decoder(model, weights), Decoder(stored_weights(model, weights))
    full = Decoder(model)
    assert narrow.weight_bytes() < 0.6 * full.weight_bytes()
    tokens = torch.randint(0, CFG.vocab_size, (batch, 12), generator=torch.Generator().manual_seed(batch))
    state = want_state = None
    for t in range(12):
        got = narrow.step(tokens[:, t], state)
        want = exact.step(tokens[:, t], want_state)
        assert_close(got, want, 1e-5)
        assert rel(got[0], full.step(tokens[:, t], want_state)[0]) < (0.02 if weights == "bf16" else 0.06)
        state, want_state = got[1], want[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_gemv_kernel_equals_float64(dtype):
    """csrc/gemv_cpu.cpp: y[g, b, o] = scale[g, o] sum_i x[g, b, i] w[g, o, i] against float64, for batch sizes that
    take each of its paths (8, 4, 2, 1 rows at once and their mixes; batch 1 two weight rows at once, an odd last row
    per group, threaded or not) and widths with a vector and a scalar tail."""
    from rwkv_dist.ops._build import cpu_extension

    gemv = cpu_extension().gemv
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 1, 768, 40), (3, 1, 37, 11), (2, 1, 24, 7), (2, 1, 5, 3), (3, 1, 1000, 13),  # batch 1: row pairs
              (3, 2, 37, 11), (3, 5, 100, 9), (2, 15, 64, 7), (1, 17, 5, 3)]
    for groups, batch, width, out in shapes:
        x = torch.randn(groups, batch, width, generator=gen)
        if dtype == torch.int8:
            w = torch.randint(-127, 128, (groups, out, width), generator=gen, dtype=torch.int8)
        else:
            w = torch.randn(groups, out, width, generator=gen).to(dtype)
        scale = torch.rand(groups, out, generator=gen) + 0.5
        want = torch.einsum("gbi,goi->gbo", x.double(), w.double())
        assert rel(gemv(x, w), want) < 1e-5
        assert rel(gemv(x, w, scale), want * scale.double()[:, None]) < 1e-5
    with pytest.raises(RuntimeError, match="gemv"):
        gemv(torch.randn(1, 1, 8), torch.randn(1, 4, 8).half())
