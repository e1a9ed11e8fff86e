"""Machines where csrc/'s CPU kernels cannot be built: no working compiler. The automatic backends fall back, after one
warning, to the pure-PyTorch ops (the same math), so a laptop without g++ still trains and decodes; asking for the CPU
kernel by name, or requiring the kernels (RWKV_DIST_CPU_KERNELS=require, as the tests do), gives one line naming the
compiler. (A compiler without OpenMP is tested in test_wkv.py: it builds.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from rwkv_dist.model.decode import Decoder

from helpers import random_model

REPO = Path(__file__).resolve().parents[1]

# Run where the compiler is /bin/false (as good as none) and the extension cache is empty: train one step's gradients,
# decode a step with fp32 and int8 weights, then ask for the CPU WKV kernel by name. Writes what it got to argv[1].
CHILD = r"""
import os, sys, warnings
import torch
sys.path.insert(0, "tests")
from helpers import random_model
from rwkv_dist import errors
from rwkv_dist.model.decode import Decoder
from rwkv_dist.ops.wkv import wkv4

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = random_model(n_layer=2, n_embd=32, vocab_size=64).train()
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    logits = model(tokens)
    logits.square().mean().backward()
    decoded = {w: Decoder(model, w).step(tokens[:, 0])[0] for w in ("fp32", "int8")}
build_warnings = [str(w.message) for w in caught if "could not build the CPU kernels" in str(w.message)]
try:
    wkv4(torch.zeros(4), torch.zeros(4), torch.zeros(1, 3, 4), torch.zeros(1, 3, 4), backend="cpu")
    named_error = None
except errors.KernelBuildError as exc:
    named_error = str(exc)
os.environ["RWKV_DIST_CPU_KERNELS"] = "require"  # and where the kernels are required, the model's forward says why
try:
    model(tokens)
    required_error = None
except errors.KernelBuildError as exc:
    required_error = str(exc)
torch.save({"logits": logits.detach(), "grads": {n: p.grad for n, p in model.named_parameters()},
            "decoded": decoded, "warnings": build_warnings, "error": named_error, "required": required_error},
           sys.argv[1])
"""


def test_without_a_compiler_training_and_decoding_fall_back_to_the_torch_ops(tmp_path):
    out = tmp_path / "got.pt"
    env = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "RWKV_DIST_WKV_BACKEND": "auto", "RWKV_DIST_MIX_BACKEND": "auto", "RWKV_DIST_CPU_KERNELS": "auto"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out, weights_only=True)

    # One warning for the whole process, one line, naming the compiler and what to do.
    assert len(got["warnings"]) == 1, got["warnings"]
    (warning,) = got["warnings"]
    assert "\n" not in warning and "'/bin/false'" in warning and "pure-PyTorch" in warning
    # Asking for the kernel by name is an error, one line, the same reason.
    assert got["error"] is not None and "\n" not in got["error"] and "'/bin/false'" in got["error"]
    assert "install g++" in got["error"]
    assert got["required"] == got["error"]  # RWKV_DIST_CPU_KERNELS=require: no fallback

    # The fallback computes what the kernels compute here (this process has them): logits, every gradient, decoding.
    model = random_model(n_layer=2, n_embd=32, vocab_size=64).train()
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    logits = model(tokens)
    logits.square().mean().backward()
    torch.testing.assert_close(got["logits"], logits.detach(), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    for weights, step_logits in got["decoded"].items():
        want = Decoder(model, weights).step(tokens[:, 0])[0]
        torch.testing.assert_close(step_logits, want, rtol=1e-5, atol=1e-5, msg=weights)
