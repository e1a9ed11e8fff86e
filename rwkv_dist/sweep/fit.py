"""Scaling-law fit of sweep results: L(N, D) = E + A / N^alpha + B / D^beta (the Chinchilla form, Hoffmann et al. 2022).

N = model parameters (`params`), D = training tokens (`tokens`), C = training FLOPs ~ 6 N D (`flops`).
The sweep runner writes one CSV row per run with the columns in REQUIRED_COLUMNS; only rows with status "done" are
fitted, and each uses val_loss, or train_loss where val_loss is empty. `fit_results` is the one-call entry point:
read the CSV, fit, write fit.json and two PNGs. Bad input raises DataError with one line naming the file and problem.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np
from scipy.optimize import least_squares, nnls
from scipy.special import logsumexp, softmax

from ..errors import DataError

ArrayLike = Union[float, Sequence[float], np.ndarray]

REQUIRED_COLUMNS = ("run", "params", "tokens", "flops", "train_loss", "val_loss", "status")
N_FIT_PARAMS = 5  # E, A, alpha, B, beta: with fewer points than this the fit is underdetermined
# Hoffmann et al.'s Huber delta on log-loss residuals: beyond ~0.1% error a point counts linearly, not quadratically,
# so one diverged or mislogged run cannot drag the exponents.
HUBER_DELTA = 1e-3
EXPONENT_GRID = np.linspace(0.05, 2.0, 40)  # starting alpha/beta values; published exponents lie in 0.05-1
EXPONENT_BOUNDS = (1e-4, 4.0)
N_STARTS = 4  # best grid points refined by least squares; the fit keeps the lowest cost
BUDGET_MULTIPLES = (1, 10, 100, 1000)  # default budgets: these multiples of the largest observed FLOPs


@dataclass(frozen=True)
class LossFit:
    """A fitted L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    rms: float  # RMS of log(predicted) - log(observed) over the fitted points, i.e. roughly the relative error
    n_points: int

    def predict(self, N: ArrayLike, D: ArrayLike) -> float | np.ndarray:
        """Loss at N parameters and D tokens; a float for scalar input, else an array (numpy broadcasting)."""
        n, d = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        loss = self.E + self.A * n ** -self.alpha + self.B * d ** -self.beta
        return float(loss) if loss.ndim == 0 else loss

    def coefficients(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha, "B": self.B, "beta": self.beta}


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == gives arrays, not a bool
class Points:
    """The finished runs of a results table, as arrays."""

    runs: list[str]
    params: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    loss: np.ndarray


# ---------------------------------------------------------------------------------------------------------- reading


def read_results(csv_path: str | Path) -> list[dict[str, str]]:
    """The rows of a sweep results CSV (all statuses), after checking that it is readable and has every column."""
    path = Path(csv_path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read results CSV: {getattr(e, 'strerror', None) or e}") from e
    if not header:
        raise DataError(f"{path}: empty file, expected a CSV header with columns {', '.join(REQUIRED_COLUMNS)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (header has: {', '.join(header)})")
    return rows


def finished_points(rows: Sequence[Mapping[str, Any]], source: str = "rows", first_line: int | None = None) -> Points:
    """Rows with status "done" as arrays; others are skipped unread (a failed run may have empty losses).

    `source` names the table in error messages; with `first_line` (2 for a CSV: line 1 is the header) they give the
    file line, otherwise the 1-based row index.
    """
    runs, values = [], []
    for i, row in enumerate(rows):
        if str(row.get("status", "")).strip() != "done":
            continue
        where = f"{source}: line {first_line + i}" if first_line is not None else f"{source}: row {i + 1}"
        val_loss = _positive(row, "val_loss", where, optional=True)
        loss = val_loss if val_loss is not None else _positive(row, "train_loss", where)
        values.append((_positive(row, "params", where), _positive(row, "tokens", where),
                       _positive(row, "flops", where), loss))
        runs.append(str(row.get("run", "")))
    table = np.array(values, dtype=float).reshape(-1, 4)
    return Points(runs, *table.T)


def _positive(row: Mapping[str, Any], key: str, where: str, optional: bool = False) -> float | None:
    """row[key] as a positive finite float; None for an empty optional cell."""
    if key not in row:
        raise DataError(f"{where}: missing column '{key}'")
    value = row[key]
    if value is None or str(value).strip() == "":
        if optional:
            return None
        raise DataError(f"{where}: '{key}' is empty")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: '{key}' is not a number: {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise DataError(f"{where}: '{key}' must be positive and finite, got {value!r}")
    return number


# ---------------------------------------------------------------------------------------------------------- fitting


def fit_loss(N: ArrayLike, D: ArrayLike, L: ArrayLike, *, huber_delta: float = HUBER_DELTA,
             source: str = "fit_loss") -> LossFit:
    """Fit L(N, D) = E + A / N^alpha + B / D^beta, robustly, in log space.

    Minimizes the Huber loss of log(E + A N^-alpha + B D^-beta) - log(L) (Hoffmann et al.): log residuals weigh
    small and large models alike. Parameters are (log E, log A, alpha, log B, beta), which keeps E, A, B > 0.
    Starting points come from a grid over (alpha, beta) where, for each pair, the model is linear in E, A, B and is
    solved by non-negative least squares; the best few are refined with scipy's least_squares.
    """
    n, d, loss = _check_points(N, D, L, source)
    log_loss = np.log(loss)
    # Centre the logs: A / N^alpha = A_c (N/N0)^-alpha with N0 the geometric mean. Uncentred, log N ~ 14-21 makes
    # alpha and log A almost perfectly correlated and the optimizer crawls along that ridge.
    n0, d0 = np.log(n).mean(), np.log(d).mean()
    x, y = np.log(n) - n0, np.log(d) - d0
    # E, A_c and B_c cannot exceed the largest loss by much; the lower bounds are "effectively zero".
    lo_log, hi_log = log_loss.min() - 25.0, log_loss.max() + 2.0
    lower = np.array([lo_log, lo_log, EXPONENT_BOUNDS[0], lo_log, EXPONENT_BOUNDS[0]])
    upper = np.array([hi_log, hi_log, EXPONENT_BOUNDS[1], hi_log, EXPONENT_BOUNDS[1]])

    best = None
    for start in _grid_starts(x, y, loss, huber_delta):
        start = np.clip(start, lower + 1e-9, upper - 1e-9)
        result = least_squares(_residuals, start, jac=_jacobian, bounds=(lower, upper), args=(x, y, log_loss),
                               loss="huber", f_scale=huber_delta, x_scale="jac", xtol=1e-12, ftol=1e-12,
                               gtol=1e-12, max_nfev=2000)
        if best is None or result.cost < best.cost:
            best = result
    log_e, log_a_c, alpha, log_b_c, beta = best.x
    residuals = _residuals(best.x, x, y, log_loss)
    return LossFit(E=math.exp(log_e), A=math.exp(log_a_c + alpha * n0), alpha=float(alpha),
                   B=math.exp(log_b_c + beta * d0), beta=float(beta),
                   rms=float(np.sqrt(np.mean(residuals ** 2))), n_points=len(loss))


def fit_rows(rows: Sequence[Mapping[str, Any]], source: str = "rows") -> LossFit:
    """fit_loss on the finished runs of a results table given as dict rows (e.g. csv.DictReader's)."""
    points = finished_points(rows, source)
    return fit_loss(points.params, points.tokens, points.loss, source=source)


def _check_points(N: ArrayLike, D: ArrayLike, L: ArrayLike, source: str) -> tuple[np.ndarray, ...]:
    arrays = [np.asarray(a, dtype=float).ravel() for a in (N, D, L)]
    if len({a.size for a in arrays}) != 1:
        raise DataError(f"{source}: N, D and L differ in length ({', '.join(str(a.size) for a in arrays)})")
    for name, a in zip(("N (params)", "D (tokens)", "loss"), arrays):
        if not np.all(np.isfinite(a) & (a > 0)):
            bad = a[~(np.isfinite(a) & (a > 0))][0]
            raise DataError(f"{source}: every {name} must be positive and finite, got {bad}")
    count = arrays[0].size
    if count < N_FIT_PARAMS:
        raise DataError(f"{source}: need at least {N_FIT_PARAMS} finished runs (status 'done') to fit "
                        f"{N_FIT_PARAMS} parameters (E, A, alpha, B, beta), got {count}")
    # The data pin each term only up to a constant that E absorbs: A/N^alpha plus that constant is three unknowns,
    # so 2 distinct sizes fit any alpha exactly. Likewise B/D^beta and token counts.
    for name, a in zip(("model sizes (params)", "token counts (tokens)"), arrays[:2]):
        if (distinct := np.unique(a).size) < 3:
            raise DataError(f"{source}: need at least 3 distinct {name} to fit the scaling exponents, got {distinct}")
    # Likewise when log D is an affine function of log N (e.g. every run at 20 tokens per parameter).
    x, y = (np.log(a) - np.log(a).mean() for a in arrays[:2])
    if np.std(y - (x @ y) / (x @ x) * x) < 1e-6:
        raise DataError(f"{source}: tokens follow params exactly (a fixed power law, e.g. constant tokens per "
                        f"parameter), so the N and D terms cannot be separated; vary tokens per model size")
    return tuple(arrays)


def _grid_starts(x: np.ndarray, y: np.ndarray, loss: np.ndarray, huber_delta: float) -> Iterator[np.ndarray]:
    """The N_STARTS best (log E, log A_c, alpha, log B_c, beta) over the exponent grid, best first."""
    scored = []
    for alpha in EXPONENT_GRID:
        for beta in EXPONENT_GRID:
            columns = np.stack([np.ones_like(x), np.exp(-alpha * x), np.exp(-beta * y)], axis=1)
            # Dividing each row by its loss makes the linear residual a relative error, close to the log residual.
            coef, _ = nnls(columns / loss[:, None], np.ones_like(loss))
            predicted = columns @ coef
            if np.any(predicted <= 0):
                continue
            scored.append((_huber(np.log(predicted / loss), huber_delta), alpha, beta, coef))
    scored.sort(key=lambda s: s[0])
    if not scored:  # no grid point gave a positive prediction: start from equal thirds of the typical loss
        third = math.log(float(np.median(loss)) / 3)
        yield np.array([third, third, 0.3, third, 0.3])
    for _, alpha, beta, (e, a_c, b_c) in scored[:N_STARTS]:
        # A zero coefficient has no log; the caller clips -inf to the lower bound.
        with np.errstate(divide="ignore"):
            yield np.array([np.log(e), np.log(a_c), alpha, np.log(b_c), beta])


def _huber(r: np.ndarray, delta: float) -> float:
    """The same cost least_squares(loss="huber", f_scale=delta) minimizes, so grid and refinement agree."""
    a = np.abs(r)
    return float(np.sum(np.where(a <= delta, 0.5 * r ** 2, delta * (a - 0.5 * delta))))


def _terms(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """log of the three loss terms E, A_c (N/N0)^-alpha, B_c (D/D0)^-beta, one row per term."""
    log_e, log_a_c, alpha, log_b_c, beta = theta
    return np.stack([np.full_like(x, log_e), log_a_c - alpha * x, log_b_c - beta * y])


def _residuals(theta: np.ndarray, x: np.ndarray, y: np.ndarray, log_loss: np.ndarray) -> np.ndarray:
    return logsumexp(_terms(theta, x, y), axis=0) - log_loss


def _jacobian(theta: np.ndarray, x: np.ndarray, y: np.ndarray, log_loss: np.ndarray) -> np.ndarray:
    # d logsumexp / d term = that term's share of the loss (softmax): exact, and cheaper than finite differences.
    w_e, w_a, w_b = softmax(_terms(theta, x, y), axis=0)
    return np.stack([w_e, w_a, -w_a * x, w_b, -w_b * y], axis=1)


# ------------------------------------------------------------------------------------------------- compute-optimal


def compute_optimal(fit: LossFit, flops: ArrayLike) -> tuple[float | np.ndarray, float | np.ndarray]:
    """(N_opt, D_opt) minimizing fit.predict(N, D) subject to 6 N D = flops.

    Setting dL/dN = 0 along D = C / (6N) gives N_opt = G (C/6)^(beta/(alpha+beta)) with
    G = (alpha A / (beta B))^(1/(alpha+beta)), and D_opt = (C/6) / N_opt. Floats for scalar input, else arrays.
    """
    c = np.asarray(flops, dtype=float)
    if not np.all(np.isfinite(c) & (c > 0)):
        raise ValueError(f"compute_optimal: FLOP budgets must be positive and finite, got {flops!r}")
    if not (fit.A > 0 and fit.B > 0 and fit.alpha > 0 and fit.beta > 0):
        raise ValueError(f"compute_optimal: the fit has no N/D trade-off (needs A, B, alpha, beta > 0): {fit}")
    s = fit.alpha + fit.beta
    # In logs: A and B can be large enough (A ~ e^40 for alpha ~ 2) that alpha*A/(beta*B) over/underflows.
    log_g = (math.log(fit.alpha * fit.A) - math.log(fit.beta * fit.B)) / s
    n_opt = np.exp(log_g + fit.beta / s * np.log(c / 6))
    d_opt = c / 6 / n_opt
    if c.ndim == 0:
        return float(n_opt), float(d_opt)
    return n_opt, d_opt


# ---------------------------------------------------------------------------------------------------------- plots


def _figure(title: str) -> tuple[Any, Any]:
    # An Agg canvas attached to a bare Figure renders PNGs without pyplot, so importing or calling this module never
    # switches the process-wide backend of an interactive session.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _size_colors(sizes: np.ndarray) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(len(sizes) - 1, 1)) for i in range(len(sizes))]


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale * 0.9995:  # 999_999 is "1M", not "1e+03K"
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def plot_loss_vs_compute(rows: Sequence[Mapping[str, Any]], fit: LossFit, path: str | Path) -> Path:
    """PNG of loss vs training FLOPs, one series per model size, plus the fit's compute-optimal frontier."""
    points = finished_points(rows)
    fig, ax = _figure(f"Loss vs compute ({len(points.loss)} runs)")
    sizes = np.unique(points.params)
    for size, color in zip(sizes, _size_colors(sizes)):
        mine = points.params == size
        order = np.argsort(points.flops[mine])
        ax.plot(points.flops[mine][order], points.loss[mine][order], "o-", color=color, label=f"N = {_human(size)}")
    budgets = np.logspace(np.log10(points.flops.min()), np.log10(points.flops.max()), 200)
    n_opt, d_opt = compute_optimal(fit, budgets)
    ax.plot(budgets, fit.predict(n_opt, d_opt), "k--", label="compute-optimal (fit)")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return Path(path)


def plot_fit_vs_observed(rows: Sequence[Mapping[str, Any]], fit: LossFit, path: str | Path) -> Path:
    """PNG scatter of fitted vs observed loss per run, coloured by model size, with the y = x line."""
    points = finished_points(rows)
    fitted = fit.predict(points.params, points.tokens)
    fig, ax = _figure(f"Fit vs observed (RMS log residual {fit.rms:.2g})")
    sizes = np.unique(points.params)
    for size, color in zip(sizes, _size_colors(sizes)):
        mine = points.params == size
        ax.scatter(points.loss[mine], fitted[mine], color=color, label=f"N = {_human(size)}")
    low = min(points.loss.min(), fitted.min())
    high = max(points.loss.max(), fitted.max())
    ax.plot([low, high], [low, high], "k--", linewidth=1, label="y = x")
    ax.set_xlabel("observed loss")
    ax.set_ylabel("fitted loss")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------- entry


def fit_results(csv_path: str | Path, out_dir: str | Path, budgets: Sequence[float] | None = None) -> dict[str, Any]:
    """Read a sweep results CSV, fit, write out_dir/fit.json, loss_vs_compute.png and fit_vs_observed.png.

    `budgets` are the FLOP budgets to report the compute-optimal N, D and predicted loss for; default: the largest
    observed FLOPs times 1, 10, 100 and 1000. Returns what fit.json holds.
    """
    source = str(csv_path)
    rows = read_results(csv_path)
    points = finished_points(rows, source, first_line=2)
    fit = fit_loss(points.params, points.tokens, points.loss, source=source)
    if budgets is None:
        budgets = [float(points.flops.max()) * k for k in BUDGET_MULTIPLES]
    budgets = np.atleast_1d(np.asarray(budgets, dtype=float))
    n_opt, d_opt = compute_optimal(fit, budgets)
    fitted = fit.predict(points.params, points.tokens)
    result = {
        "source": source,
        "form": "L(N, D) = E + A / N^alpha + B / D^beta",
        **fit.coefficients(),
        "rms_log_residual": fit.rms,
        "n_points": fit.n_points,
        "points": [{"run": run, "params": int(n), "tokens": int(d), "flops": float(c), "loss": float(obs),
                    "fitted": float(fit_)}
                   for run, n, d, c, obs, fit_ in zip(points.runs, points.params, points.tokens, points.flops,
                                                       points.loss, fitted)],
        "compute_optimal": [{"flops": float(c), "params": float(n), "tokens": float(d),
                             "tokens_per_param": float(d / n), "loss": fit.predict(n, d)}
                            for c, n, d in zip(budgets, n_opt, d_opt)],
        "plots": {"loss_vs_compute": "loss_vs_compute.png", "fit_vs_observed": "fit_vs_observed.png"},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: fit.json stays strict JSON that any reader accepts.
    (out / "fit.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    plot_loss_vs_compute(rows, fit, out / result["plots"]["loss_vs_compute"])
    plot_fit_vs_observed(rows, fit, out / result["plots"]["fit_vs_observed"])
    return result
