"""Test-wide settings: every cache and temp file stays inside the repo's ignored .cache/ folder."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"

for var, sub in (("TORCH_EXTENSIONS_DIR", "torch_extensions"), ("RAY_TMPDIR", "ray"), ("TMPDIR", "tmp"),
                 ("HF_HOME", "hf"), ("XDG_CACHE_HOME", "xdg")):
    os.environ.setdefault(var, str(CACHE / sub))
    Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RWKV_CUDA_ON", "0")  # the `rwkv` pip package must not try to build its CUDA kernel
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
