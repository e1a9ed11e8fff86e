"""`rwkv-dist info` on the paper's configs and one clear error for each kind of bad config or argument."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from rwkv_dist.info import model_info

PAPER = {  # name: (params, forward FLOPs/token = 2 (V D + 13 D^2 L))
    "169m": 169_342_464, "430m": 430_397_440, "1.5b": 1_515_106_304,
    "3b": 2_984_627_200, "7b": 7_392_649_216, "14b": 14_148_597_760,
}


@pytest.mark.parametrize("name", PAPER)
def test_info_gives_the_paper_parameter_counts(repo, name):
    info = model_info(repo / f"configs/model/rwkv4-{name}.yaml")
    assert info["params"] == PAPER[name]
    D, L, V = info["n_embd"], info["n_layer"], info["vocab_size"]
    assert V == 50277 and info["flops_per_token_fwd"] == 2 * (V * D + 13 * D * D * L)
    assert info["bytes_bf16"] == 2 * PAPER[name]


def test_info_json_cli(repo):
    result = run_cli("info", repo / "configs/model/rwkv4-14b.yaml", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["params"] == 14_148_597_760
    assert info["flops_per_token_fwd"] == 27_777_812_480  # the paper's 2.778e10


def test_paper_lr_recipe_in_configs(repo):
    from rwkv_dist.config import load_model_file

    lrs = {n: load_model_file(repo / f"configs/model/rwkv4-{n}.yaml").optimizer for n in PAPER}
    assert (lrs["169m"].lr_init, lrs["169m"].lr_final) == (6e-4, 1e-5)
    assert (lrs["14b"].lr_init, lrs["14b"].lr_final) == (1e-4, 7e-6)
    assert all(o.betas == (0.9, 0.99) and o.eps == 1e-8 and o.weight_decay == 0 for o in lrs.values())


BAD_CONFIGS = [
    ("model:\n  n_layer: 2\n  n_embd: 8\n  vocab_size: 10\n  n_head: 4\n", "model.n_head: unknown field"),
    ("model:\n  n_layer: 0\n  n_embd: 8\n  vocab_size: 10\n", "model.n_layer: Input should be greater than or equal to 1 (got 0)"),
    ("model:\n  n_layer: 2\n  n_embd: wide\n  vocab_size: 10\n", "model.n_embd: Input should be a valid integer"),
    ("model:\n  n_layer: 2\n  n_embd: 8\n", "model.vocab_size: Field required"),
    ("modle:\n  n_layer: 2\n", "modle: unknown field"),
    ("model: [1, 2\n", "not valid YAML (line 2)"),
    ("- 1\n- 2\n", "expected a mapping at the top level"),
    ("model:\n  n_layer: 2\n  n_embd: 8\n  vocab_size: 10\noptimizer:\n  lr_init: -1\n  lr_final: 1\n",
     "optimizer.lr_init: Input should be greater than 0"),
    ("model:\n  n_layer: 2\n  n_embd: 8\n  vocab_size: 10\nprecision: fp8\n", "precision: Input should be"),
]


@pytest.mark.parametrize("text, message", BAD_CONFIGS)
def test_bad_config_is_one_clear_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run_cli("info", path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"rwkv-dist info: error: {path}: ") and result.stderr.count("\n") == 1
    assert message in result.stderr


def test_missing_config_file(tmp_path):
    result = run_cli("info", tmp_path / "nope.yaml")
    assert result.returncode == 2 and "nope.yaml: no such config file" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["export", "x.pth", "--format", "onnx", "--out", "y"], "invalid choice: 'onnx'"),
    (["export", "x.pth", "--format", "hf"], "the following arguments are required: --out"),
    (["info"], "the following arguments are required: config"),
    (["train-everything"], "invalid choice: 'train-everything'"),
])
def test_bad_arguments(args, message):
    result = run_cli(*args)
    assert result.returncode == 2 and message in result.stderr
