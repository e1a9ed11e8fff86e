"""The RWKV-4 model: parallel mode vs recurrent mode, segments, names, the official initialization, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_model

from rwkv_dist.errors import ShapeError
from rwkv_dist.model import RWKV, RWKVConfig


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("n_layer, n_embd, T", [(1, 16, 9), (3, 32, 40), (4, 48, 70)])
def test_parallel_mode_equals_recurrent_mode(n_layer, n_embd, T):
    model = random_model(seed=n_layer, n_layer=n_layer, n_embd=n_embd)
    tokens = torch.randint(0, 64, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        parallel, state_par = model(tokens, return_state=True)
        state, steps = None, []
        for t in range(T):
            logits, state = model.step(tokens[:, t], state)
            steps.append(logits)
    assert rel_err(torch.stack(steps, 1), parallel) <= 1e-5
    for name, a, b in zip(state._fields, state, state_par):
        assert rel_err(a, b) <= 1e-5, name


def test_parallel_segments_with_state_equal_one_pass_and_gradients():
    model = random_model(seed=3)
    tokens = torch.randint(0, 64, (2, 50), generator=torch.Generator().manual_seed(2))
    full = model(tokens)
    first, state = model(tokens[:, :17], return_state=True)
    second, _ = model(tokens[:, 17:], state=state)
    assert rel_err(torch.cat((first, second), 1), full) <= 1e-6
    # backprop through the carried state reaches the first segment's weights like one pass does
    g_full = torch.autograd.grad(full.square().mean(), model.blocks[0].att.value.weight)[0]
    first, state = model(tokens[:, :17], return_state=True)
    second, _ = model(tokens[:, 17:], state=state)
    g_seg = torch.autograd.grad(torch.cat((first, second), 1).square().mean(), model.blocks[0].att.value.weight)[0]
    assert rel_err(g_seg, g_full) <= 1e-5


def test_bf16_model_runs_with_fp32_wkv_and_tracks_fp32():
    model = random_model(seed=4)
    tokens = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(0))
    ref = model(tokens)
    low = model.to(torch.bfloat16)(tokens)
    assert low.dtype == torch.bfloat16
    assert rel_err(low, ref) < 0.05  # bf16 weights and activations: ~3 significant digits through 3 blocks
    low.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


BLINKDL_BLOCK_KEYS = {
    "ln1.weight": (32,), "ln1.bias": (32,), "ln2.weight": (32,), "ln2.bias": (32,),
    "att.time_decay": (32,), "att.time_first": (32,),
    "att.time_mix_k": (1, 1, 32), "att.time_mix_v": (1, 1, 32), "att.time_mix_r": (1, 1, 32),
    "att.key.weight": (32, 32), "att.value.weight": (32, 32), "att.receptance.weight": (32, 32),
    "att.output.weight": (32, 32),
    "ffn.time_mix_k": (1, 1, 32), "ffn.time_mix_r": (1, 1, 32),
    "ffn.key.weight": (128, 32), "ffn.receptance.weight": (32, 32), "ffn.value.weight": (32, 128),
}


def test_state_dict_uses_blinkdl_names_and_shapes():
    sd = RWKV(RWKVConfig(n_layer=2, n_embd=32, vocab_size=50)).state_dict()
    expected = {"emb.weight": (50, 32), "blocks.0.ln0.weight": (32,), "blocks.0.ln0.bias": (32,),
                "ln_out.weight": (32,), "ln_out.bias": (32,), "head.weight": (50, 32)}
    for layer in range(2):
        expected.update({f"blocks.{layer}.{k}": v for k, v in BLINKDL_BLOCK_KEYS.items()})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_paper_parameter_count_formula():
    for L, D, V in [(1, 8, 10), (12, 768, 50277), (40, 5120, 50277)]:
        cfg = RWKVConfig(n_layer=L, n_embd=D, vocab_size=V)
        assert cfg.num_params() == 2 * V * D + 13 * D * D * L + D * (11 * L + 4)
    model = RWKV(RWKVConfig(n_layer=3, n_embd=24, vocab_size=30))
    assert sum(p.numel() for p in model.parameters()) == model.cfg.num_params()


# ---- initialization: each rule of the official init (model/init.py) recomputed here from its formula ----

L, D, V = 4, 48, 200


@pytest.fixture(scope="module")
def fresh():
    torch.manual_seed(0)
    return RWKV(RWKVConfig(n_layer=L, n_embd=D, vocab_size=V))


def test_init_time_decay_and_time_first(fresh):
    for l, block in enumerate(fresh.blocks):
        for i in (0, 1, 17, D - 1):
            expect = -5 + 8 * (i / (D - 1)) ** (0.7 + 1.3 * l / (L - 1))
            assert block.att.time_decay[i].item() == pytest.approx(expect, abs=1e-6)
            assert block.att.time_first[i].item() == pytest.approx(math.log(0.3) + 0.5 * ((i + 1) % 3 - 1), abs=1e-6)


def test_init_token_shift_mixes(fresh):
    for l, block in enumerate(fresh.blocks):
        for i in (0, 5, D - 1):
            mu_k = (i / D) ** (1 - l / L)
            assert block.att.time_mix_k[0, 0, i].item() == pytest.approx(mu_k, abs=1e-6)
            assert block.att.time_mix_v[0, 0, i].item() == pytest.approx(mu_k + 0.3 * l / (L - 1), abs=1e-6)
            assert block.att.time_mix_r[0, 0, i].item() == pytest.approx((i / D) ** (0.5 * (1 - l / L)), abs=1e-6)
            assert block.ffn.time_mix_k[0, 0, i].item() == pytest.approx(mu_k, abs=1e-6)
            assert block.ffn.time_mix_r[0, 0, i].item() == pytest.approx(mu_k, abs=1e-6)


def test_init_matrices(fresh):
    def gram_is(w: torch.Tensor, gain: float):
        # orthogonal with gain g: the smaller Gram matrix is g^2 I
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(gram, gain**2 * torch.eye(gram.shape[0]), atol=1e-4, rtol=1e-4)

    for block in fresh.blocks:
        for name in ("att.key", "att.receptance", "att.output", "ffn.value", "ffn.receptance"):
            assert torch.count_nonzero(block.get_submodule(name).weight) == 0, name
        gram_is(block.att.value.weight, 1.0)
        gram_is(block.ffn.key.weight, math.sqrt(4 * D / D))
    gram_is(fresh.head.weight, 0.5 * math.sqrt(V / D))
    emb = fresh.emb.weight
    assert emb.abs().max() <= 1e-4 and emb.std() > 1e-5
    for module in fresh.modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_single_layer_init_is_defined():
    block = RWKV(RWKVConfig(n_layer=1, n_embd=8, vocab_size=10)).blocks[0]
    assert torch.isfinite(block.att.time_decay).all()


def test_meta_device_allocates_nothing_for_14b():
    with torch.device("meta"):
        model = RWKV(RWKVConfig(n_layer=40, n_embd=5120, vocab_size=50277))
    assert sum(p.numel() for p in model.parameters()) == 14_148_597_760
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("tokens, message", [
    (torch.zeros(2, 3), "int64 or int32"),
    (torch.zeros(2, dtype=torch.long), r"\[B, T\]"),
    ([[1, 2]], r"\[B, T\]"),
])
def test_bad_tokens(tokens, message):
    with pytest.raises(ShapeError, match=message):
        random_model()(tokens)


def test_bad_step_tokens():
    with pytest.raises(ShapeError, match=r"\[B\]"):
        random_model().step(torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("fields, message", [
    (dict(n_layer=2, n_embd=8, vocab_size=10, n_head=4), "n_head"),
    (dict(n_layer=0, n_embd=8, vocab_size=10), "n_layer"),
    (dict(n_layer=2, n_embd="wide", vocab_size=10), "n_embd"),
    (dict(n_layer=2, n_embd=8), "vocab_size"),
])
def test_bad_model_config(fields, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        RWKVConfig(**fields)


def test_decoding_layout_keeps_values_names_and_outputs():
    model = random_model(seed=9)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits, state = model.step(tokens[:, 0])
    model.for_decoding()
    assert not model.head.weight.is_contiguous() and model.head.weight.shape == before["head.weight"].shape
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    logits2, state2 = model.step(tokens[:, 0])
    assert rel_err(logits2, logits) <= 1e-6
    assert rel_err(model(tokens), random_model(seed=9)(tokens)) <= 1e-6
