"""The run config (YAML + key=value overrides), the LR schedule and the optimizer's parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from rwkv_dist.config import load_run_config
from rwkv_dist.errors import ConfigError
from rwkv_dist.model import RWKV, RWKVConfig
from rwkv_dist.train import lr_at, param_groups
from rwkv_dist.train.loss import L2WRAP_SCALE, lm_loss


@pytest.fixture
def demo(repo):
    return repo / "configs" / "demo.yaml"


def test_demo_config_loads_and_overrides_apply(demo):
    cfg = load_run_config(demo)
    assert cfg.model.n_layer == 4 and cfg.parallel.strategy == "zero3" and cfg.optimizer.time_decay_lr_mult == 2
    cfg = load_run_config(demo, ["schedule.steps=50", "model.n_embd=64", "parallel.offload_optimizer=true",
                                 "data.sources=[{location: a, weight: 2}, {location: b}]"])
    assert (cfg.schedule.steps, cfg.model.n_embd, cfg.parallel.offload_optimizer) == (50, 64, True)
    assert [s.weight for s in cfg.data.sources] == [2.0, 1.0]
    cfg.check_world_size(2)


BAD = [
    (["optimizer.lr_init=fast"], "optimizer.lr_init: Input should be a valid number"),
    (["schedule.steps=0"], "schedule.steps: Input should be greater than or equal to 1"),
    (["parallel.strategy=fsdp"], "parallel.strategy: Input should be 'zero3', 'ddp' or 'pipeline'"),
    (["model.n_head=4"], "model.n_head: unknown field"),
    (["trainer.steps=4"], "trainer: unknown field"),
    (["optimizer.warmup_steps=1000"], "warmup_steps (1000) exceeds schedule.steps (600)"),
    (["optimizer.lr_final=1"], "lr_final (1.0) exceeds lr_init"),
    (["schedule.micro_batch_size=3"], "global_batch_size (16) is not a multiple of micro_batch_size x grad_accum (3 x 1)"),
    (["parallel.strategy=ddp", "parallel.offload_params=true"], "offload_params needs strategy zero3"),
    (["data.sources=[]"], "data.sources: List should have at least 1 item"),
    (["data.on_error=ignore"], "data.on_error: Input should be 'skip' or 'fail'"),
    (["logging.peak_flops=-1"], "logging.peak_flops: Input should be greater than 0"),
    (["precision=fp8"], "precision: Input should be 'auto', 'fp32' or 'bf16'"),
    (["schedule"], "is not key.path=value"),
    (["model.n_layer.x=3"], "n_layer is not a section"),
    (["model.n_layer=[1"], "value is not valid YAML"),
    (["data.sources=[{weight: 1}]"], "data.sources.0.location: Field required"),
]


@pytest.mark.parametrize("overrides, message", BAD)
def test_bad_run_configs_are_one_clear_error(demo, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_run_config(demo, overrides)
    text = str(e.value)
    assert text.startswith(f"{demo}: ") and "\n" not in text and message in text, text


def test_world_size_must_fit_the_global_batch(demo):
    with pytest.raises(ConfigError, match=r"8 x 1 x 3 = 24, but global_batch_size is 16"):
        load_run_config(demo).check_world_size(3)


def test_lr_schedule_follows_the_official_shape(demo):
    opt = load_run_config(demo, ["optimizer.warmup_steps=10", "schedule.steps=110"]).optimizer
    assert lr_at(0, opt, 110) == pytest.approx(0.2 * opt.lr_init)
    assert lr_at(5, opt, 110) == pytest.approx(0.6 * opt.lr_init)
    assert lr_at(10, opt, 110) == pytest.approx(opt.lr_init)
    assert lr_at(60, opt, 110) == pytest.approx(math.sqrt(opt.lr_init * opt.lr_final))  # halfway, geometric
    assert lr_at(110, opt, 110) == pytest.approx(opt.lr_final) == lr_at(500, opt, 110)


def test_param_groups_multipliers_and_no_decay_on_vectors(demo):
    opt = load_run_config(demo, ["optimizer.weight_decay=0.1"]).optimizer
    model = RWKV(RWKVConfig(n_layer=2, n_embd=16, vocab_size=32))
    groups = param_groups(model, opt)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["blocks.1.att.time_decay"])]["lr_mult"] == 2.0
    assert by_param[id(named["blocks.0.att.time_first"])]["lr_mult"] == 3.0
    assert by_param[id(named["blocks.0.att.key.weight"])]["weight_decay"] == 0.1
    for name in ("blocks.0.ln1.weight", "blocks.0.att.time_mix_k", "emb.weight", "blocks.1.att.time_decay"):
        assert by_param[id(named[name])]["weight_decay"] == 0.0, name
    assert sum(len(g["params"]) for g in groups) == len(named)
    torch.optim.AdamW(groups, lr=opt.lr_init, betas=opt.betas, eps=opt.eps)  # the groups are valid AdamW groups


def _reference_loss(logits, target, divisor, positions):
    """Independent float64 reference: autograd of the summed cross-entropy / divisor + L2Wrap's penalty
    (scale / 2 / positions) * sum of the squared max logits."""
    ref = logits.detach().double().requires_grad_()
    ce = torch.nn.functional.cross_entropy(ref.flatten(0, -2), target.flatten(), reduction="sum") / divisor
    penalty = (L2WRAP_SCALE / 2 / positions) * ref.max(-1).values.square().sum()
    (g,) = torch.autograd.grad(0.5 * (ce + penalty), ref)  # a scaled loss, as under gradient accumulation
    return ce.detach(), g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("segment", [False, True])
def test_lm_loss_is_cross_entropy_whose_gradient_carries_the_max_logit_penalty(dtype, segment):
    """The fused loss + L2Wrap against float64 autograd: its value is the cross-entropy (L2Wrap changes no value),
    its gradient that of cross-entropy + the penalty, scaled by the incoming gradient; a segment of a window divides
    by the window's positions (24 here) for both."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 5, 11, dtype=torch.float64)).to(dtype).requires_grad_()
    target = torch.randint(0, 11, (3, 5))
    divisor = positions = 24 if segment else 15
    loss = lm_loss(logits, target, divisor=divisor if segment else None, positions=positions if segment else None)
    (g,) = torch.autograd.grad(loss * 0.5, logits)
    ce, g_ref = _reference_loss(logits, target, divisor, positions)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]  # bf16: the gradient's rounding
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # fp32 math for bf16 logits
    assert loss.item() == pytest.approx(ce.item(), rel=1e-6 if dtype != torch.float64 else 1e-12)
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol * 1e-2)
    # and without L2Wrap: the cross-entropy's gradient alone
    plain = logits.detach().double().requires_grad_()
    (g_plain,) = torch.autograd.grad(lm_loss(plain, target, l2wrap=False), plain)
    (g_ce,) = torch.autograd.grad(torch.nn.functional.cross_entropy(plain.flatten(0, 1), target.flatten()), plain)
    torch.testing.assert_close(g_plain, g_ce, rtol=1e-12, atol=1e-15)


PAPER_RUNS = {"169m": 8, "430m": 8, "1.5b": 16, "3b": 32, "7b": 32, "14b": 64}


@pytest.mark.parametrize("size, gpus", PAPER_RUNS.items())
def test_paper_size_run_configs_take_the_model_files_recipe(repo, size, gpus):
    from rwkv_dist.config import load_model_file

    cfg = load_run_config(repo / "configs" / "train" / f"rwkv4-{size}.yaml")
    model_file = load_model_file(repo / "configs" / "model" / f"rwkv4-{size}.yaml")
    assert cfg.model == model_file.model and model_file.precision == "bf16"  # the paper trained in bf16
    assert cfg.precision == "auto"  # bf16 on the GPUs that compute it natively
    assert (cfg.optimizer.lr_init, cfg.optimizer.lr_final) == (model_file.optimizer.lr_init, model_file.optimizer.lr_final)
    assert cfg.optimizer.betas == (0.9, 0.99) and cfg.parallel.strategy == "zero3"
    cfg.check_world_size(gpus)
    assert cfg.schedule.steps * cfg.schedule.global_batch_size * cfg.model.ctx_len >= 329e9  # the 330B-token budget


def test_base_file_errors_name_the_file(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"run.yaml: base: no such file .*missing.yaml"):
        load_run_config(run)
    run.write_text("base: [1]\n")
    with pytest.raises(ConfigError, match=r"run.yaml: base: expected a file name, got \[1\]"):
        load_run_config(run)
