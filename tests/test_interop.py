"""Interchange with the RWKV world: the `rwkv` pip package (BlinkDL format) and transformers' RwkvForCausalLM."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from helpers import random_model, run_cli

from rwkv_dist.errors import CheckpointError
from rwkv_dist.export import export_state_dict
from rwkv_dist.model.state_dict import load_rwkv, read_state_dict


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_logits_equal_rwkv_pip_package(tmp_path):
    os.environ["RWKV_CUDA_ON"] = "0"
    from rwkv.model import RWKV as PipRWKV

    model = random_model(seed=5, n_layer=3, n_embd=32, vocab_size=64)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    pip_model = PipRWKV(model=str(tmp_path / "model.pth"), strategy="cpu fp32", verbose=False)
    tokens = torch.randint(0, 64, (24,), generator=torch.Generator().manual_seed(0))
    ours = model(tokens[None])[0].detach()
    theirs, pip_state = pip_model.forward(tokens[:16].tolist(), None, full_output=True)
    assert rel_err(theirs, ours[:16]) <= 1e-4
    # their recurrent state continues where ours does
    theirs_next, _ = pip_model.forward(tokens[16:].tolist(), pip_state, full_output=True)
    assert rel_err(theirs_next, ours[16:]) <= 1e-4


def test_logits_equal_transformers_after_hf_export(tmp_path):
    from transformers import RwkvForCausalLM

    model = random_model(seed=6, n_layer=3, n_embd=32, vocab_size=64)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    result = run_cli("export", tmp_path / "model.pth", "--format", "hf", "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    hf = RwkvForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(hf(tokens).logits, model(tokens)) <= 1e-4


def test_official_format_round_trips_unchanged(tmp_path):
    """An official-style file (BlinkDL names, bf16 tensors like the released RWKV-4 weights) loads into RWKV to continue
    pretraining, and RWKV's state dict / blinkdl export give back exactly the same tensors."""
    official = {k: v.to(torch.bfloat16) for k, v in random_model(seed=7).state_dict().items()}
    torch.save(official, tmp_path / "RWKV-4-official.pth")
    sd = read_state_dict(tmp_path / "RWKV-4-official.pth")
    kept = load_rwkv(sd, dtype=None).state_dict()
    assert kept.keys() == official.keys() and all(torch.equal(kept[k], official[k]) for k in official)
    master = load_rwkv(sd)  # float32 masters for training: the same values, widened exactly
    assert all(torch.equal(v.to(torch.bfloat16), official[k]) for k, v in master.state_dict().items())
    out = export_state_dict(master.state_dict(), "blinkdl", tmp_path / "export.pth", dtype=torch.bfloat16)
    again = torch.load(out, weights_only=True)
    assert all(torch.equal(again[k], official[k]) for k in official)
    tokens = torch.randint(0, 64, (1, 12))
    assert torch.equal(master(tokens), load_rwkv(again)(tokens))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_unsafe_pickles_are_refused_without_running_them(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"emb.weight": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="not a readable state dict"):
        read_state_dict(path)
    assert not (tmp_path / "pwned_marker").exists() and not os.path.exists("pwned_marker")


def _mangle(sd, how):
    sd = dict(sd)
    if how == "missing":
        del sd["blocks.1.att.time_first"]
    elif how == "extra":
        sd["blocks.1.att.bonus"] = torch.zeros(3)
    elif how == "shape":
        sd["blocks.0.ffn.value.weight"] = torch.zeros(32, 64)
    elif how == "not rwkv":
        sd = {"weight": torch.zeros(3)}
    return sd


@pytest.mark.parametrize("how, message", [
    ("missing", r"missing keys \(1\): blocks.1.att.time_first"),
    ("extra", r"unexpected keys \(1\): blocks.1.att.bonus"),
    ("shape", r"wrong shapes \(1\): blocks.0.ffn.value.weight \(32, 64\) != \(32, 128\)"),
    ("not rwkv", "missing key 'emb.weight'"),
])
def test_bad_state_dicts_are_named(tmp_path, how, message):
    sd = _mangle(random_model(seed=8).state_dict(), how)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=message):
        load_rwkv(read_state_dict(tmp_path / "bad.pth"), source=str(tmp_path / "bad.pth"))
    out = tmp_path / "out.pth"
    result = run_cli("export", tmp_path / "bad.pth", "--format", "blinkdl", "--out", out)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "bad.pth" in result.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.pth"], "nothing written on failure"


def test_missing_source_file_is_one_clear_error(tmp_path):
    result = run_cli("export", tmp_path / "nope.pth", "--format", "hf", "--out", tmp_path / "hf")
    assert result.returncode == 2
    assert result.stderr.strip() == f"rwkv-dist export: error: {tmp_path / 'nope.pth'}: no such file"
