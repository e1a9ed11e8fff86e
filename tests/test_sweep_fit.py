"""Scaling-law fit of sweep results: parameter recovery, compute-optimal allocation, fit.json + plots, bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from scipy.optimize import minimize_scalar

from rwkv_dist.errors import DataError
from rwkv_dist.sweep.fit import (LossFit, compute_optimal, finished_points, fit_loss, fit_results, fit_rows,
                                 read_results)

TRUE = dict(E=1.7, A=400.0, alpha=0.34, B=410.0, beta=0.28)
COLUMNS = ["run", "n_layer", "n_embd", "params", "tokens", "flops", "train_loss", "val_loss", "wall_s", "status"]


def true_loss(N, D):
    return TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"]


def synthetic(noise: float = 0.0, seed: int = 0, sizes: int = 6, budgets: int = 6):
    """Losses of the true law on a sizes x budgets grid (N 1e6-1e9, D 1e8-1e11), times exp(noise * normal)."""
    N, D = (a.ravel() for a in np.meshgrid(np.logspace(6, 9, sizes), np.logspace(8, 11, budgets), indexing="ij"))
    L = true_loss(N, D) * np.exp(noise * np.random.default_rng(seed).normal(size=N.size))
    return N, D, L


def synthetic_rows(noise: float = 0.003, seed: int = 0, sizes: int = 4, budgets: int = 4) -> list[dict]:
    N, D, L = synthetic(noise, seed, sizes, budgets)
    return [{"run": f"r{i}", "n_layer": 4, "n_embd": 128, "params": int(n), "tokens": int(d), "flops": 6.0 * n * d,
             "train_loss": loss * 1.01, "val_loss": loss, "wall_s": 12.5, "status": "done"}
            for i, (n, d, loss) in enumerate(zip(N, D, L))]


def write_csv(path: Path, rows: list[dict], columns: list[str] = COLUMNS) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------------------- recovery


def test_noise_free_fit_recovers_the_law_exactly():
    fit = fit_loss(*synthetic())
    assert fit.n_points == 36
    assert fit.alpha == pytest.approx(TRUE["alpha"], abs=1e-5)
    assert fit.beta == pytest.approx(TRUE["beta"], abs=1e-5)
    assert fit.E == pytest.approx(TRUE["E"], abs=1e-5)
    assert fit.A == pytest.approx(TRUE["A"], rel=1e-3)
    assert fit.B == pytest.approx(TRUE["B"], rel=1e-3)
    assert fit.rms < 1e-8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_fit_recovers_exponents_and_floor(seed):
    # 0.3% multiplicative noise, about seed-to-seed variation of a language-model loss. E is the least constrained
    # parameter: it lies below every observed loss (the lowest is ~2.4), so it is an extrapolation.
    fit = fit_loss(*synthetic(noise=0.003, seed=seed))
    assert abs(fit.alpha - TRUE["alpha"]) < 0.03
    assert abs(fit.beta - TRUE["beta"]) < 0.03
    assert abs(fit.E - TRUE["E"]) < 0.05
    assert 0.001 < fit.rms < 0.006  # the residuals are the noise, neither absorbed (overfit) nor inflated


def test_one_bad_run_does_not_drag_the_fit():
    # The Huber loss counts a large residual linearly: a run logged at 1.5x its loss barely moves the exponents.
    N, D, L = synthetic()
    L[7] *= 1.5
    fit = fit_loss(N, D, L)
    assert abs(fit.alpha - TRUE["alpha"]) < 0.01
    assert abs(fit.beta - TRUE["beta"]) < 0.01
    assert abs(fit.E - TRUE["E"]) < 0.02


def test_predict_scalar_and_array():
    fit = LossFit(**TRUE, rms=0.0, n_points=0)
    assert isinstance(fit.predict(1e8, 1e10), float)
    assert fit.predict(1e8, 1e10) == pytest.approx(true_loss(1e8, 1e10))
    N, D, L = synthetic()
    np.testing.assert_allclose(fit.predict(N, D), L)


# ------------------------------------------------------------------------------------------------ compute-optimal


@pytest.mark.parametrize("flops", [1e17, 1e20, 1e23, 1e26])
def test_compute_optimal_closed_form_matches_numeric_minimum(flops):
    fit = LossFit(**TRUE, rms=0.0, n_points=0)
    n_opt, d_opt = compute_optimal(fit, flops)
    assert 6 * n_opt * d_opt == pytest.approx(flops, rel=1e-12)

    def loss_at(log_n):  # loss along the budget: D = C / (6N)
        n = math.exp(log_n)
        return fit.predict(n, flops / (6 * n))

    numeric = minimize_scalar(loss_at, bounds=(0.0, math.log(flops / 6)), method="bounded",
                              options={"xatol": 1e-9})
    assert n_opt == pytest.approx(math.exp(numeric.x), rel=0.01)
    assert d_opt == pytest.approx(flops / (6 * math.exp(numeric.x)), rel=0.01)
    assert fit.predict(n_opt, d_opt) <= numeric.fun + 1e-12


def test_compute_optimal_is_vectorized_and_rejects_bad_budgets():
    fit = LossFit(**TRUE, rms=0.0, n_points=0)
    budgets = np.array([1e18, 1e21])
    n_opt, d_opt = compute_optimal(fit, budgets)
    assert n_opt.shape == d_opt.shape == (2,)
    assert np.all(np.diff(n_opt) > 0) and np.all(np.diff(d_opt) > 0)  # both grow with compute
    with pytest.raises(ValueError, match="positive"):
        compute_optimal(fit, [1e20, -1.0])


# ------------------------------------------------------------------------------------------------ results -> files


def check_png(path: Path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0  # something was drawn


def test_fit_results_writes_fit_json_and_plots(tmp_path):
    rows = synthetic_rows()
    rows[3]["val_loss"] = ""  # no validation: train_loss is used
    rows.append({"run": "crashed", "params": 5_000_000, "tokens": "", "flops": "", "train_loss": "", "val_loss": "",
                 "status": "failed"})
    path = write_csv(tmp_path / "results.csv", rows)

    result = fit_results(path, tmp_path / "out")

    saved = json.loads((tmp_path / "out" / "fit.json").read_text())
    assert saved == result
    for key in ("E", "A", "alpha", "B", "beta", "rms_log_residual", "n_points", "points", "compute_optimal"):
        assert key in saved, key
    assert saved["n_points"] == 16 and len(saved["points"]) == 16
    assert saved["points"][3]["loss"] == pytest.approx(float(rows[3]["train_loss"]))
    assert abs(saved["alpha"] - TRUE["alpha"]) < 0.05 and abs(saved["beta"] - TRUE["beta"]) < 0.05
    max_flops = max(float(r["flops"]) for r in rows if r["status"] == "done")
    budgets = saved["compute_optimal"]
    assert [b["flops"] for b in budgets] == pytest.approx([max_flops * k for k in (1, 10, 100, 1000)])
    for b in budgets:
        assert 6 * b["params"] * b["tokens"] == pytest.approx(b["flops"])
        assert b["loss"] > saved["E"]
    assert budgets[-1]["loss"] < budgets[0]["loss"]  # more compute, lower loss
    check_png(tmp_path / "out" / "loss_vs_compute.png")
    check_png(tmp_path / "out" / "fit_vs_observed.png")


def test_fit_results_with_explicit_budgets(tmp_path):
    path = write_csv(tmp_path / "results.csv", synthetic_rows())
    result = fit_results(path, tmp_path / "out", budgets=[1e21])
    assert [b["flops"] for b in result["compute_optimal"]] == [1e21]


def test_rows_not_done_are_ignored():
    done = synthetic_rows()
    # Unfinished runs carry values that would be rejected (or distort the fit) if they were read.
    junk = [{"run": "a", "params": 10, "tokens": 10, "flops": 600, "train_loss": -1, "val_loss": "",
             "status": "failed"},
            {"run": "b", "params": "", "tokens": "", "flops": "", "train_loss": "", "val_loss": "",
             "status": "running"},
            {"run": "c", "params": 1e7, "tokens": 1e9, "flops": 6e16, "train_loss": 99.0, "val_loss": 99.0,
             "status": "diverged"}]
    assert fit_rows(junk + done) == fit_rows(done)
    assert len(finished_points(junk + done).loss) == len(done)


def test_csv_reads_back_as_rows(tmp_path):
    rows = synthetic_rows()
    read = read_results(write_csv(tmp_path / "results.csv", rows))
    assert [r["run"] for r in read] == [r["run"] for r in rows]
    assert fit_rows(read).alpha == pytest.approx(fit_rows(rows).alpha, abs=1e-6)


# ------------------------------------------------------------------------------------------------------ bad input


def _missing_column(path: Path):
    write_csv(path, synthetic_rows(), [c for c in COLUMNS if c != "tokens"])


def _too_few_runs(path: Path):
    rows = synthetic_rows()
    for row in rows[4:]:
        row["status"] = "failed"
    write_csv(path, rows)


def _negative_loss(path: Path):
    rows = synthetic_rows()
    rows[5]["val_loss"] = -0.5
    write_csv(path, rows)


def _zero_params(path: Path):
    rows = synthetic_rows()
    rows[2]["params"] = 0
    write_csv(path, rows)


def _not_a_number(path: Path):
    rows = synthetic_rows()
    rows[1]["tokens"] = "lots"
    write_csv(path, rows)


def _two_model_sizes(path: Path):
    rows = synthetic_rows()
    for row in rows:
        row["params"] = min(row["params"], 10_000_000)
    write_csv(path, rows)


def _fixed_tokens_per_param(path: Path):
    rows = synthetic_rows()
    for row in rows:
        row["tokens"] = 20 * row["params"]
    write_csv(path, rows)


def _empty(path: Path):
    path.write_text("")


def _binary(path: Path):
    path.write_bytes(b"\xff\xfe\x00garbage\x9c")


@pytest.mark.parametrize("make, message", [
    (_missing_column, "missing column"),
    (_too_few_runs, "at least 5 finished runs"),
    (_negative_loss, "line 7: 'val_loss' must be positive"),
    (_zero_params, "line 4: 'params' must be positive"),
    (_not_a_number, "'tokens' is not a number"),
    (_two_model_sizes, "3 distinct model sizes"),
    (_fixed_tokens_per_param, "cannot be separated"),
    (_empty, "empty file"),
    (_binary, "cannot read"),
])
def test_bad_input_raises_one_line_data_error_naming_the_file(tmp_path, make, message):
    path = tmp_path / "results.csv"
    make(path)
    with pytest.raises(DataError) as error:
        fit_results(path, tmp_path / "out")
    text = str(error.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text
    assert not (tmp_path / "out").exists()  # nothing written on failure


def test_missing_file_raises_data_error(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="nope.csv: cannot read"):
        fit_results(path, tmp_path / "out")
