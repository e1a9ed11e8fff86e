"""The fused cross-entropy kernel (csrc/loss_cpu.cpp, through rwkv_dist.train.loss) against float64: the loss, its
gradient with and without L2Wrap's extra term, in every storage dtype, on rows whose width is not a multiple of the
vector width, with ties for the largest logit; NaN rows, bad targets, and the torch path kept for other devices."""

import pytest
import torch

from rwkv_dist.train import loss as loss_mod
from rwkv_dist.train.loss import L2WRAP_SCALE, lm_loss, token_cross_entropy

TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # of the gradient's largest entry


def _expected(logits: torch.Tensor, targets: torch.Tensor, divisor: int, factor: float, grad_loss: float):
    """float64, written out: loss = sum(lse - x[t]) / divisor; gradient = (softmax - onehot(t)) * grad_loss / divisor
    + onehot(first argmax) * max * grad_loss * factor."""
    x = logits.detach().double().flatten(0, -2)
    t = targets.flatten()
    lse = torch.logsumexp(x, dim=-1)
    loss = (lse - x.gather(1, t[:, None])[:, 0]).sum() / divisor
    grad = torch.softmax(x, dim=-1)
    grad[torch.arange(len(t)), t] -= 1
    grad *= grad_loss / divisor
    top = x.max(dim=-1).values
    first = (x == top[:, None]).double().argmax(dim=-1)  # the first column holding the maximum
    grad[torch.arange(len(t)), first] += top * grad_loss * factor
    return loss, grad.view(logits.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, 8, 19, 2051])  # one column; under, at and past one vector; many + a tail
@pytest.mark.parametrize("l2wrap", [False, True])
def test_kernel_matches_float64(dtype, vocab, l2wrap):
    g = torch.Generator().manual_seed(vocab)
    rows = 48  # 48 x 2051 is enough to split over threads
    logits = (4 * torch.randn(2, rows // 2, vocab, generator=g, dtype=torch.float64)).to(dtype)
    if vocab > 1:  # ties for the largest logit: L2Wrap's term goes to the first of them, as torch.max picks
        logits[0, 0, -1] = logits[0, 0, 0] = logits[0, 0].max() + 1
    targets = torch.randint(0, vocab, (2, rows // 2), generator=g)
    assert loss_mod._use_kernel(logits), "the CPU kernel must be what is tested"
    leaf = logits.clone().requires_grad_()
    loss = lm_loss(leaf, targets, l2wrap=l2wrap, divisor=40, positions=50)
    (grad,) = torch.autograd.grad(loss * 0.5, leaf)  # a scaled loss, as under gradient accumulation
    want_loss, want_grad = _expected(logits, targets, 40, L2WRAP_SCALE / 50 if l2wrap else 0.0, 0.5)
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.shape == logits.shape
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6, abs=1e-6)
    subnormal_step = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # fp16 stores L2Wrap's ~1e-6 terms subnormal
    assert (grad.double() - want_grad).abs().max() <= TOLERANCE[dtype] * want_grad.abs().max() + subnormal_step
    # evaluation's cross-entropy (no autograd) takes the same kernel
    for reduction, scale in (("sum", 1), ("mean", rows)):
        value = token_cross_entropy(logits, targets, reduction=reduction).item()
        assert value == pytest.approx(want_loss.item() * 40 / scale, rel=1e-6, abs=1e-6)


def test_kernel_and_torch_paths_agree_and_the_torch_path_is_selectable(monkeypatch):
    g = torch.Generator().manual_seed(3)
    logits, targets = 3 * torch.randn(64, 300, generator=g), torch.randint(0, 300, (64,), generator=g)
    results = {}
    for backend in ("auto", "reference"):
        monkeypatch.setenv("RWKV_DIST_LOSS_BACKEND", backend)
        assert loss_mod._use_kernel(logits) == (backend == "auto")
        leaf = logits.clone().requires_grad_()
        loss = lm_loss(leaf, targets)
        results[backend] = (loss.detach(), torch.autograd.grad(loss, leaf)[0])
    torch.testing.assert_close(results["auto"][0], results["reference"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results["auto"][1], results["reference"][1], rtol=1e-5, atol=1e-9)
    assert not loss_mod._use_kernel(logits.double())  # float64 (and CUDA) logits take the torch ops


def test_nan_rows_give_nan_and_bad_targets_are_named():
    logits = torch.randn(4, 37)
    logits[2, 5] = float("nan")
    targets = torch.tensor([0, 36, 1, 2])
    assert torch.isnan(lm_loss(logits, targets))  # the trainer's guard sees a non-finite loss and skips the step
    rows = loss_mod.cpu_extension().cross_entropy_forward(*loss_mod._rows(logits, targets))[0]
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()
    for bad in (37, -1):
        with pytest.raises(IndexError, match=f"target {bad} is out of bounds for 37 classes"):
            lm_loss(logits, torch.tensor([0, bad, 1, 2]))
