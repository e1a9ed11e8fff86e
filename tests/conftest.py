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
# A kernel that fails to compile must fail the tests, not fall back to the reference ops they compare against.
os.environ.setdefault("RWKV_DIST_CPU_KERNELS", "require")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> str:
    """The embedded corpus as a dataset (2048-token tokenizer, shards with a val split)."""
    from rwkv_dist.demo import prepare_data

    _, location = prepare_data(tmp_path_factory.mktemp("corpus"))
    return location


@pytest.fixture(scope="session")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    """The same 6-step fp32 run: 1 process (ZeRO-3, accumulation 2), 2 processes ZeRO-3, 2 processes ddp."""
    from helpers import TRAIN_WORKER, train

    root = tmp_path_factory.mktemp("runs")
    out = {"one": root / "one", "zero3": root / "zero3", "ddp": root / "ddp"}
    train(data, out["one"], 1)
    train(data, out["zero3"], 2, script=TRAIN_WORKER)
    train(data, out["ddp"], 2, "parallel.strategy=ddp")
    return out
