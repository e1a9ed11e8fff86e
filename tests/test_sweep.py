"""`rwkv-dist sweep` on a local Ray instance: a 3 sizes x 3 token budgets grid trained for real, then fitted; bad specs.
(Restarts, WSD branches, isoFLOP budgets, retries: test_sweep_isoflop.py.)"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import run_cli

SWEEP_ENV = {"RAY_DEDUP_LOGS": "0"}


def write_sweep(repo: Path, data: str, out: Path, **changes) -> Path:
    sweep = yaml.safe_load((repo / "configs" / "sweeps" / "tiny-cpu.yaml").read_text())
    sweep["base"] = str(repo / "configs" / "demo.yaml")
    sweep["out_dir"] = str(out)
    sweep["overrides"] = [o for o in sweep["overrides"] if not o.startswith("data.")] + [
        f"data.sources=[{{location: {data}}}]", f"data.val={data}", "model.ctx_len=32"]
    sweep["grid"]["tokens"] = [4096, 8192, 16384]  # 16-64 steps of 256 tokens: seconds per run
    sweep.update(changes)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def sweep(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rwkv_dist.cli", "sweep", str(path)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, **SWEEP_ENV})


def table(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished(repo, data, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    path = write_sweep(repo, data, out)
    done = sweep(path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return path, out, done


def test_the_grid_runs_to_completion_with_a_results_table(finished):
    _, out, done = finished
    rows = table(out)
    assert len(rows) == 9 and all(r["status"] == "done" for r in rows)
    assert {(r["n_layer"], r["n_embd"]) for r in rows} == {("1", "32"), ("2", "48"), ("2", "96")}
    assert sorted({int(r["tokens"]) for r in rows}) == [4096, 8192, 16384]
    for r in rows:  # compute by the model's own count; 6ND kept beside it for comparison
        assert int(r["flops"]) == int(r["flops_per_token"]) * int(r["tokens"]) == int(r["flops_spent"])
        assert int(r["flops_6nd"]) == 6 * int(r["params"]) * int(r["tokens"])
        assert r["role"] == "run" and r["attempts"] == "1" and r["error"] == ""
        assert 0 < float(r["val_loss"]) < 8 and float(r["wall_s"]) > 0
        assert (out / "runs" / r["run"] / "checkpoints" / "latest").is_file()
    # more tokens, lower validation loss, for every size
    for size in {(r["n_layer"], r["n_embd"]) for r in rows}:
        vals = [float(r["val_loss"]) for r in sorted(rows, key=lambda r: int(r["tokens"]))
                if (r["n_layer"], r["n_embd"]) == size]
        assert vals == sorted(vals, reverse=True), (size, vals)
    assert "9 runs (0 finished before, 9 to run)" in done.stdout


def test_sweep_fit_writes_the_fit_and_plots(finished, tmp_path):
    _, out, _ = finished
    done = run_cli("sweep-fit", out, "--out", tmp_path / "fit", "--budgets", "1e12", "1e14")
    assert done.returncode == 0, done.stderr
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert fit["n_points"] == 9 and fit["alpha"] > 0 and fit["beta"] > 0
    assert [p["flops"] for p in fit["compute_optimal"]] == [1e12, 1e14]
    small, big = fit["compute_optimal"]
    assert big["params"] > small["params"] and big["tokens"] > small["tokens"] and big["loss"] < small["loss"]
    from matplotlib.image import imread

    for name in ("loss_vs_compute.png", "fit_vs_observed.png"):
        image = imread(tmp_path / "fit" / name)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


SWEEP_ERRORS = [
    ({"grid": {"models": [], "tokens": [1000]}}, "grid.models: List should have at least 1 item"),
    ({"max_concurrent": 0}, "max_concurrent: Input should be greater than or equal to 1"),
    ({"base": "/nonexistent/run.yaml"}, "base: no such run config /nonexistent/run.yaml"),
    ({"resources": {"workers_per_run": 3}}, "x world size = 8 x 1 x 3 = 24, but global_batch_size is 8"),
    ({"overrides": ["schedule.steps=x"]}, "schedule.steps: Input should be a valid integer"),
    ({"grid": {"models": [{"n_layer": 1}], "tokens": [1000]}}, "grid.models.0.n_embd: Field required"),
]


@pytest.mark.parametrize("changes, message", SWEEP_ERRORS)
def test_bad_sweeps_are_one_clear_error_before_any_run(repo, data, tmp_path, capsys, changes, message):
    from rwkv_dist.cli import main  # in-process: the CLI's own error path, without an interpreter start per case

    path = write_sweep(repo, data, tmp_path / "bad", **changes)
    assert main(["sweep", str(path)]) == 2
    stderr = capsys.readouterr().err
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("rwkv-dist sweep: error: ") and message in lines[0], stderr
    assert not (tmp_path / "bad").exists()
