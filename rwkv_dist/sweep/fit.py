"""Scaling-law fits of sweep results (Hoffmann et al. 2022's Approaches 2 and 3), with bootstrap intervals.

N = model parameters (`params`, or `params_non_embedding` with params="non-embedding"), D = training tokens
(`tokens`), C = training FLOPs (`flops`: the sweep writes the model's own count, 3 x forward FLOPs per token x tokens;
FlopsModel fits flops/token = k N^gamma to the runs, so compute-optimal allocations follow that count, not 6ND).
Approach 3: L(N, D) = E + A / N^alpha + B / D^beta fitted robustly (Huber, log space) to every finished run.
Approach 2: for an isoFLOP sweep (a `budget` column), a parabola of loss in ln N per budget, its minimum, and power
laws N_opt ~ C^a, D_opt ~ C^b through the minima. Intervals: percentile bootstrap over runs (Besiroglu et al. 2024).
The sweep runner writes one CSV row per run with the columns in REQUIRED_COLUMNS; only rows with status "done" are
fitted (not the constant-LR runs of WSD sweeps), each with val_loss, or train_loss where val_loss is empty; with an
LR axis each (N, D) keeps its lowest-loss run. `fit_results` is the one-call entry point: read the CSV, fit, write
fit.json, PNGs and report.md. Bad input raises DataError with one line naming the file and problem.
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
    """The finished runs of a results table, as arrays (budget and lr NaN where the table has none)."""

    runs: list[str]
    params: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    loss: np.ndarray
    budget: np.ndarray | None = None
    lr: np.ndarray | None = None

    def take(self, index: np.ndarray) -> "Points":
        return Points([self.runs[i] for i in index], *(None if a is None else a[index] for a in
                                                        (self.params, self.tokens, self.flops, self.loss, self.budget,
                                                         self.lr)))


@dataclass(frozen=True)
class FlopsModel:
    """Training FLOPs per token as k N^gamma, fitted to the runs' own FLOPs/tokens (the model's count, which for
    RWKV-4 is 6 N_matmul + 6 V D: not exactly proportional to N). C = 6 N D is k = 6, gamma = 1."""

    k: float = 6.0
    gamma: float = 1.0

    def per_token(self, n: ArrayLike) -> np.ndarray:
        return self.k * np.asarray(n, dtype=float) ** self.gamma

    @staticmethod
    def of(points: "Points") -> "FlopsModel":
        n, per = np.unique(np.stack([points.params, points.flops / points.tokens], axis=1), axis=0).T
        if np.unique(n).size < 2:
            return FlopsModel(float(np.median(per / n)), 1.0)
        gamma, log_k = np.polyfit(np.log(n), np.log(per), 1)
        return FlopsModel(float(math.exp(log_k)), float(gamma))


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


PARAMS_COLUMNS = {"total": "params", "non-embedding": "params_non_embedding"}
PARAMS_MEANING = {"total": "total parameters (embedding, head and blocks)",
                  "non-embedding": "non-embedding parameters (the V x D embedding and head excluded)"}


def finished_points(rows: Sequence[Mapping[str, Any]], source: str = "rows", first_line: int | None = None,
                    params: str = "total") -> Points:
    """Rows with status "done" as arrays; others are skipped unread (a failed run may have empty losses), and so are
    the constant-LR runs of WSD sweeps (role "constant": their LR never decayed, they are not data points).

    `source` names the table in error messages; with `first_line` (2 for a CSV: line 1 is the header) they give the
    file line, otherwise the 1-based row index. `params` picks the definition of N: total or non-embedding.
    """
    column = PARAMS_COLUMNS[params]
    runs, values = [], []
    for i, row in enumerate(rows):
        if str(row.get("status", "")).strip() != "done" or str(row.get("role", "")).strip() == "constant":
            continue
        where = f"{source}: line {first_line + i}" if first_line is not None else f"{source}: row {i + 1}"
        val_loss = _positive(row, "val_loss", where, optional=True)
        loss = val_loss if val_loss is not None else _positive(row, "train_loss", where)
        budget = _positive(row, "budget", where, optional=True) if "budget" in row else None
        lr = _positive(row, "lr", where, optional=True) if "lr" in row else None
        values.append((_positive(row, column, where), _positive(row, "tokens", where),
                       _positive(row, "flops", where), loss, math.nan if budget is None else budget,
                       math.nan if lr is None else lr))
        runs.append(str(row.get("run", "")))
    table = np.array(values, dtype=float).reshape(-1, 6)
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
             source: str = "fit_loss", start: LossFit | None = None) -> LossFit:
    """Fit L(N, D) = E + A / N^alpha + B / D^beta, robustly, in log space.

    Minimizes the Huber loss of log(E + A N^-alpha + B D^-beta) - log(L) (Hoffmann et al.): log residuals weigh
    small and large models alike. Parameters are (log E, log A, alpha, log B, beta), which keeps E, A, B > 0.
    Starting points come from a grid over (alpha, beta) where, for each pair, the model is linear in E, A, B and is
    solved by non-negative least squares; the best few are refined with scipy's least_squares. With `start` (a fit
    of similar data: a bootstrap replicate starts from the full fit) only that fit is refined, without the grid.
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
    starts = [] if start is not None else list(_grid_starts(x, y, loss, huber_delta))
    if start is not None:
        starts.insert(0, np.array([math.log(start.E), math.log(start.A) - start.alpha * n0, start.alpha,
                                   math.log(start.B) - start.beta * d0, start.beta]))
    for theta in starts:
        theta = np.clip(theta, lower + 1e-9, upper - 1e-9)
        result = least_squares(_residuals, theta, jac=_jacobian, bounds=(lower, upper), args=(x, y, log_loss),
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


def _grid_starts(x: np.ndarray, y: np.ndarray, loss: np.ndarray, huber_delta: float,
                 count: int = N_STARTS) -> Iterator[np.ndarray]:
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
    for _, alpha, beta, (e, a_c, b_c) in scored[:count]:
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


def compute_optimal(fit: LossFit, flops: ArrayLike, flops_model: FlopsModel | None = None
                    ) -> tuple[float | np.ndarray, float | np.ndarray]:
    """(N_opt, D_opt) minimizing fit.predict(N, D) subject to flops = k N^gamma D (default k = 6, gamma = 1: 6ND).

    Along D = (C/k) N^-gamma, dL/dN = 0 gives N_opt = G (C/k)^(beta/(alpha+gamma beta)) with
    G = (alpha A / (gamma beta B))^(1/(alpha+gamma beta)), and D_opt = (C/k) / N_opt^gamma (for 6ND:
    N_opt = G (C/6)^(beta/(alpha+beta))). Floats for scalar input, else arrays.
    """
    m = flops_model or FlopsModel()
    c = np.asarray(flops, dtype=float)
    if not np.all(np.isfinite(c) & (c > 0)):
        raise ValueError(f"compute_optimal: FLOP budgets must be positive and finite, got {flops!r}")
    if not (fit.A > 0 and fit.B > 0 and fit.alpha > 0 and fit.beta > 0):
        raise ValueError(f"compute_optimal: the fit has no N/D trade-off (needs A, B, alpha, beta > 0): {fit}")
    s = fit.alpha + m.gamma * fit.beta
    # In logs: A and B can be large enough (A ~ e^40 for alpha ~ 2) that alpha*A/(beta*B) over/underflows.
    log_g = (math.log(fit.alpha * fit.A) - math.log(m.gamma * fit.beta * fit.B)) / s
    n_opt = np.exp(log_g + fit.beta / s * np.log(c / m.k))
    d_opt = c / m.per_token(n_opt)
    if c.ndim == 0:
        return float(n_opt), float(d_opt)
    return n_opt, d_opt


# ------------------------------------------------------------------------------------------------ approach 2


@dataclass(frozen=True)
class IsoFlopFit:
    """Chinchilla's Approach 2: per budget a parabola of loss in ln N; its minimum; power laws through the minima."""

    budgets: np.ndarray  # the budgets with a minimum (a parabola opening upwards), ascending
    parabolas: np.ndarray  # [budget, 3]: loss = p0 (ln N)^2 + p1 ln N + p2
    n_opt: np.ndarray
    d_opt: np.ndarray
    loss_opt: np.ndarray
    inside: np.ndarray  # whether the minimum lies within the sizes run at that budget (else an extrapolation)
    a: float  # N_opt = n_coef C^a
    n_coef: float
    b: float  # D_opt = d_coef C^b
    d_coef: float
    l_slope: float  # L_opt = l_coef C^l_slope, to read the loss at budgets that were not run
    l_coef: float
    skipped: tuple[str, ...] = ()  # budgets without a usable parabola, and why

    def at(self, flops: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = np.asarray(flops, dtype=float)
        return self.n_coef * c ** self.a, self.d_coef * c ** self.b, self.l_coef * c ** self.l_slope


def fit_isoflop(points: Points, flops_model: FlopsModel, source: str = "fit_isoflop") -> IsoFlopFit:
    """Approach 2 on the runs that name a budget: needs >= 2 budgets with >= 3 distinct sizes each."""
    if points.budget is None or np.all(np.isnan(points.budget)):
        raise DataError(f"{source}: no 'budget' values: Approach 2 needs an isoFLOP sweep (grid.budgets)")
    budgets, parabolas, n_opt, loss_opt, inside, skipped = [], [], [], [], [], []
    for c in np.unique(points.budget[~np.isnan(points.budget)]):
        mine = points.budget == c
        x, y = np.log(points.params[mine]), points.loss[mine]
        if np.unique(x).size < 3:
            skipped.append(f"{c:.3g}: {np.unique(x).size} distinct sizes (a parabola needs 3)")
            continue
        p = np.polyfit(x, y, 2)
        if p[0] <= 0:
            skipped.append(f"{c:.3g}: loss has no minimum in N (the parabola opens downwards)")
            continue
        x_min = -p[1] / (2 * p[0])
        budgets.append(c)
        parabolas.append(p)
        n_opt.append(math.exp(x_min))
        loss_opt.append(float(np.polyval(p, x_min)))
        inside.append(bool(x.min() <= x_min <= x.max()))
    if len(budgets) < 2:
        raise DataError(f"{source}: Approach 2 needs at least 2 budgets with a minimum, got {len(budgets)}"
                        + (f" ({'; '.join(skipped)})" if skipped else ""))
    c, n = np.array(budgets), np.array(n_opt)
    d = c / flops_model.per_token(n)
    lc = np.log(c)
    a, log_n = np.polyfit(lc, np.log(n), 1)
    b, log_d = np.polyfit(lc, np.log(d), 1)
    ls, log_l = np.polyfit(lc, np.log(loss_opt), 1)
    return IsoFlopFit(c, np.array(parabolas), n, d, np.array(loss_opt), np.array(inside), float(a),
                      float(math.exp(log_n)), float(b), float(math.exp(log_d)), float(ls), float(math.exp(log_l)),
                      tuple(skipped))


# ------------------------------------------------------------------------------------------------ uncertainty


def bootstrap(points: Points, fit: LossFit, flops_model: FlopsModel, budgets: np.ndarray, replicates: int,
              seed: int = 0, iso: IsoFlopFit | None = None) -> dict[str, Any]:
    """Percentile-bootstrap samples of every fitted number, by resampling runs with replacement (Besiroglu et al.
    2024: the intervals must come from the runs, not from the fit's curvature).

    Approach 3: runs drawn from all finished runs; each replicate refits from the full fit (no grid search: ~3 ms).
    Approach 2: runs drawn within each budget (so every budget keeps its parabola). A replicate that cannot be fitted
    (too few distinct sizes or token counts drawn, no minimum) is dropped and counted. Returns arrays of samples.
    """
    rng = np.random.default_rng(seed)
    count = len(points.loss)
    out: dict[str, list] = {k: [] for k in ("E", "A", "alpha", "B", "beta", "n_opt", "d_opt", "loss")}
    dropped = 0
    for _ in range(replicates):
        pick = rng.integers(0, count, count)
        try:
            f = fit_loss(points.params[pick], points.tokens[pick], points.loss[pick], start=fit)
        except DataError:
            dropped += 1
            continue
        with np.errstate(all="ignore"):
            n, d = compute_optimal(f, budgets, flops_model)
            loss = f.predict(n, d)
        if not np.all(np.isfinite([n, d, loss])) or not np.all(n > 0):  # an optimum beyond float range
            dropped += 1
            continue
        for key, value in (*f.coefficients().items(), ("n_opt", n), ("d_opt", d), ("loss", loss)):
            out[key].append(value)
    samples = {"approach3": {k: np.array(v) for k, v in out.items()}, "approach3_dropped": dropped}
    if iso is not None:
        groups = [np.flatnonzero(points.budget == c) for c in iso.budgets]
        two: dict[str, list] = {k: [] for k in ("a", "b", "n_opt", "d_opt", "loss")}
        dropped = 0
        for _ in range(replicates):
            pick = np.concatenate([rng.choice(g, g.size) for g in groups])
            try:
                r = fit_isoflop(points.take(pick), flops_model)
            except DataError:
                dropped += 1
                continue
            if r.budgets.size != iso.budgets.size:  # a budget lost its minimum: not comparable
                dropped += 1
                continue
            n, d, loss = r.at(budgets)
            if not np.all(np.isfinite([n, d, loss])):
                dropped += 1
                continue
            for key, value in (("a", r.a), ("b", r.b), ("n_opt", n), ("d_opt", d), ("loss", loss)):
                two[key].append(value)
        samples["approach2"] = {k: np.array(v) for k, v in two.items()}
        samples["approach2_dropped"] = dropped
    return samples


def interval(samples: np.ndarray, level: float) -> list | None:
    """The central `level` percentile interval of bootstrap samples (per column for 2-D samples)."""
    if samples.size == 0:
        return None
    tail = (1 - level) / 2 * 100
    return np.percentile(samples, [tail, 100 - tail], axis=0).tolist()


# ------------------------------------------------------------------------------------------------ learning rates


def best_lr_points(points: Points) -> tuple[Points, dict[str, Any] | None]:
    """With an LR axis: per (N, D) the run with the lowest loss, and the best LR per size with a power law in N
    (per size: the LR of its lowest-loss run, i.e. at its largest budget). Without one: the points unchanged."""
    if points.lr is None or np.unique(points.lr[~np.isnan(points.lr)]).size < 2:
        return points, None
    keep = []
    for key in np.unique(np.stack([points.params, points.tokens], axis=1), axis=0):
        mine = np.flatnonzero((points.params == key[0]) & (points.tokens == key[1]))
        keep.append(mine[np.argmin(points.loss[mine])])
    keep = np.array(sorted(keep))
    sizes = np.unique(points.params)
    best = [float(points.lr[points.params == n][np.argmin(points.loss[points.params == n])]) for n in sizes]
    info: dict[str, Any] = {"best_lr": [{"params": float(n), "lr": lr} for n, lr in zip(sizes, best)],
                            "runs_compared": int(points.loss.size), "points_kept": int(keep.size)}
    if sizes.size >= 2:
        slope, log_c = np.polyfit(np.log(sizes), np.log(best), 1)
        info["power_law"] = {"form": "lr_opt = c N^g", "c": float(math.exp(log_c)), "g": float(slope)}
    return points.take(keep), info


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


LABELS = {"N": "N: parameters", "C": "training FLOPs C"}  # plots say which N and C (fit_results passes its own)


def plot_loss_vs_compute(rows: Sequence[Mapping[str, Any]] | Points, fit: LossFit, path: str | Path,
                         flops_model: FlopsModel | None = None, band: tuple[np.ndarray, np.ndarray, np.ndarray] |
                         None = None, level: float = 0.9, labels: Mapping[str, str] | None = None) -> Path:
    """PNG of loss vs training FLOPs, one series per model size, the fit's compute-optimal frontier and, with
    `band` = (budgets, low, high), its bootstrap interval."""
    points = rows if isinstance(rows, Points) else finished_points(rows)
    fig, ax = _figure(f"Loss vs compute ({len(points.loss)} runs)")
    sizes = np.unique(points.params)
    for size, color in zip(sizes, _size_colors(sizes)):
        mine = points.params == size
        order = np.argsort(points.flops[mine])
        ax.plot(points.flops[mine][order], points.loss[mine][order], "o-", color=color, label=f"N = {_human(size)}")
    budgets = np.logspace(np.log10(points.flops.min()), np.log10(points.flops.max()), 200)
    n_opt, d_opt = compute_optimal(fit, budgets, flops_model)
    ax.plot(budgets, fit.predict(n_opt, d_opt), "k--", label="compute-optimal (fit)")
    if band is not None:
        ax.fill_between(band[0], band[1], band[2], color="k", alpha=0.15, label=f"{level:.0%} bootstrap band")
    ax.set_xscale("log")
    ax.set_xlabel((labels or LABELS)["C"])
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return Path(path)


def plot_fit_vs_observed(rows: Sequence[Mapping[str, Any]] | Points, fit: LossFit, path: str | Path) -> Path:
    """PNG scatter of fitted vs observed loss per run, coloured by model size, with the y = x line."""
    points = rows if isinstance(rows, Points) else finished_points(rows)
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


def plot_isoflop(points: Points, iso: IsoFlopFit, path: str | Path, labels: Mapping[str, str] | None = None) -> Path:
    """PNG of loss vs N per budget with its parabola and minimum (Approach 2)."""
    fig, ax = _figure("IsoFLOP profiles (Approach 2)")
    for c, p, n, loss, color in zip(iso.budgets, iso.parabolas, iso.n_opt, iso.loss_opt, _size_colors(iso.budgets)):
        mine = points.budget == c
        ax.scatter(points.params[mine], points.loss[mine], color=color, label=f"C = {c:.3g}")
        x = np.linspace(np.log(points.params[mine].min()) - 0.3, np.log(points.params[mine].max()) + 0.3, 100)
        ax.plot(np.exp(x), np.polyval(p, x), "-", color=color)
        ax.plot([n], [loss], "k*", markersize=10)
    ax.set_xscale("log")
    ax.set_xlabel((labels or LABELS)["N"])
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return Path(path)


def plot_n_opt(fit: LossFit, flops_model: FlopsModel, budgets: np.ndarray, path: str | Path,
               iso: IsoFlopFit | None = None, bands: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
               level: float = 0.9, labels: Mapping[str, str] | None = None) -> Path:
    """PNG of N_opt vs C from Approach 3 (and Approach 2's minima with their power law), with bootstrap bands."""
    fig, ax = _figure("Compute-optimal model size")
    grid = np.logspace(np.log10(budgets.min()), np.log10(budgets.max()), 100)
    ax.plot(grid, compute_optimal(fit, grid, flops_model)[0], "k--", label="Approach 3 (L(N, D) fit)")
    if bands and "approach3" in bands:
        ax.fill_between(budgets, *bands["approach3"], color="k", alpha=0.15, label=f"Approach 3, {level:.0%} band")
    if iso is not None:
        ax.plot(iso.budgets, iso.n_opt, "o", color="tab:red", label="Approach 2 minima")
        ax.plot(grid, iso.at(grid)[0], "-", color="tab:red", label=f"Approach 2: N_opt ~ C^{iso.a:.2f}")
        if bands and "approach2" in bands:
            ax.fill_between(budgets, *bands["approach2"], color="tab:red", alpha=0.15,
                            label=f"Approach 2, {level:.0%} band")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel((labels or LABELS)["C"])
    ax.set_ylabel(f"N_opt, {(labels or LABELS)['N']}")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------- entry


def fit_results(csv_path: str | Path, out_dir: str | Path, budgets: Sequence[float] | None = None,
                bootstrap_replicates: int = 0, seed: int = 0, params: str = "total",
                level: float = 0.9) -> dict[str, Any]:
    """Read a sweep results CSV, fit, write out_dir/fit.json, the plots and report.md. Returns what fit.json holds.

    Approach 3 (the L(N, D) fit) always; Approach 2 when the table names FLOP budgets (an isoFLOP sweep) with >= 2 of
    them at >= 3 sizes; the best LR per (N, D) when it has several LRs. `budgets` are the FLOP budgets to report
    N_opt, D_opt and the predicted loss for (default: the sweep's own budgets, else the largest observed FLOPs x 1,
    10, 100, 1000). `bootstrap_replicates` > 0 adds `level` intervals to every fitted number (seeded by `seed`).
    N is `params` (total or non-embedding); C is the table's `flops` (the sweep's: the model's own count).
    """
    if params not in PARAMS_COLUMNS:
        raise DataError(f"--params: total or non-embedding, got {params!r}")
    source = str(csv_path)
    rows = read_results(csv_path)
    if rows and PARAMS_COLUMNS[params] not in rows[0]:
        raise DataError(f"{source}: --params {params} needs the column {PARAMS_COLUMNS[params]}")
    measured = finished_points(rows, source, first_line=2, params=params)
    points, lr_info = best_lr_points(measured)
    fit = fit_loss(points.params, points.tokens, points.loss, source=source)
    flops_model = FlopsModel.of(points) if len(points.loss) else FlopsModel()
    iso, iso_note = None, None
    if points.budget is not None and not np.all(np.isnan(points.budget)):
        try:
            iso = fit_isoflop(points, flops_model, source)
        except DataError as e:
            iso_note = str(e).removeprefix(f"{source}: ")
    if budgets is None:
        own = np.unique(points.budget[~np.isnan(points.budget)]) if points.budget is not None else np.array([])
        budgets = own if own.size else [float(points.flops.max()) * k for k in BUDGET_MULTIPLES]
    budgets = np.atleast_1d(np.asarray(budgets, dtype=float))
    n_opt, d_opt = compute_optimal(fit, budgets, flops_model)
    fitted = fit.predict(points.params, points.tokens)
    samples = (bootstrap(points, fit, flops_model, budgets, bootstrap_replicates, seed, iso)
               if bootstrap_replicates > 0 else None)

    def ci(approach: str, key: str, column: int | None = None):
        if samples is None or approach not in samples:
            return None
        values = samples[approach][key]
        values = values if column is None or values.size == 0 else values[:, column]
        return interval(values, level)

    has_model_flops = bool(rows) and "flops_per_token" in rows[0]
    result: dict[str, Any] = {
        "source": source,
        "definitions": {
            "params": f"{params}: {PARAMS_MEANING[params]}",
            "compute": ("training FLOPs by the model's own count: 3 x forward FLOPs per token (rwkv-dist info) x "
                        "tokens" if has_model_flops else "the table's flops column"),
            "flops_per_token_fit": {"form": "k N^gamma", "k": flops_model.k, "gamma": flops_model.gamma},
            "loss": "val_loss, or train_loss where a run has no val_loss",
        },
        "form": "L(N, D) = E + A / N^alpha + B / D^beta",
        **fit.coefficients(),
        "rms_log_residual": fit.rms,
        "n_points": fit.n_points,
        "points": [{"run": run, "params": int(n), "tokens": int(d), "flops": float(c), "loss": float(obs),
                    "fitted": float(fit_)}
                   for run, n, d, c, obs, fit_ in zip(points.runs, points.params, points.tokens, points.flops,
                                                       points.loss, fitted)],
        "compute_optimal": [{"flops": float(c), "params": float(n), "tokens": float(d),
                             "tokens_per_param": float(d / n), "loss": fit.predict(n, d),
                             **({"params_ci": ci("approach3", "n_opt", i), "tokens_ci": ci("approach3", "d_opt", i),
                                 "loss_ci": ci("approach3", "loss", i)} if samples else {})}
                            for i, (c, n, d) in enumerate(zip(budgets, n_opt, d_opt))],
        "plots": {"loss_vs_compute": "loss_vs_compute.png", "fit_vs_observed": "fit_vs_observed.png",
                  "n_opt_vs_compute": "n_opt_vs_compute.png"},
    }
    if samples is not None:
        result["bootstrap"] = {"replicates": bootstrap_replicates, "seed": seed, "level": level,
                               "method": "percentile; runs resampled with replacement (Approach 2: within budgets)",
                               "dropped": {k.split("_")[0]: samples[k] for k in samples if k.endswith("_dropped")}}
        result["intervals"] = {k: ci("approach3", k) for k in ("E", "A", "alpha", "B", "beta")}
    if iso is not None:
        n2, d2, l2 = iso.at(budgets)
        result["approach2"] = {
            "form": "per budget: loss = p0 (ln N)^2 + p1 ln N + p2; N_opt = n_coef C^a, D_opt = d_coef C^b",
            "a": iso.a, "b": iso.b, "n_coef": iso.n_coef, "d_coef": iso.d_coef,
            **({"a_ci": ci("approach2", "a"), "b_ci": ci("approach2", "b")} if samples else {}),
            "minima": [{"flops": float(c), "params": float(n), "tokens": float(d), "tokens_per_param": float(d / n),
                        "loss": float(loss), "within_sizes_run": bool(inside), "parabola": p.tolist()}
                       for c, n, d, loss, inside, p in zip(iso.budgets, iso.n_opt, iso.d_opt, iso.loss_opt,
                                                            iso.inside, iso.parabolas)],
            "compute_optimal": [{"flops": float(c), "params": float(n), "tokens": float(d),
                                 "tokens_per_param": float(d / n), "loss": float(loss),
                                 **({"params_ci": ci("approach2", "n_opt", i), "tokens_ci": ci("approach2", "d_opt", i),
                                     "loss_ci": ci("approach2", "loss", i)} if samples else {})}
                                for i, (c, n, d, loss) in enumerate(zip(budgets, n2, d2, l2))],
            "skipped_budgets": list(iso.skipped),
        }
        result["plots"]["isoflop"] = "isoflop.png"
    elif iso_note:
        result["approach2"] = {"not_fitted": iso_note}
    # Approach 3's exponent of N_opt in C, for comparison with Approach 2's a
    result["n_opt_exponent"] = fit.beta / (fit.alpha + flops_model.gamma * fit.beta)
    if lr_info is not None:
        result["learning_rate"] = lr_info
    spent = _column_sum(rows, "flops_spent")
    if spent is not None:
        independent = sum(float(r["flops"]) for r in rows if r.get("role") != "constant" and r.get("flops")
                          and str(r.get("status")) == "done")  # the finished data points, each from scratch
        result["compute_spent"] = {"flops_spent": spent, "flops_independent_runs": independent,
                                   "saved_fraction": 1 - spent / independent if independent else 0.0,
                                   "note": "WSD cooldown branches share their constant-LR phase; independent = the "
                                           "same data points each trained from scratch"}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    band = None
    if samples is not None and samples["approach3"]["loss"].size and budgets.size > 1:
        band = (budgets, *np.percentile(samples["approach3"]["loss"], [(1 - level) * 50, 100 - (1 - level) * 50],
                                        axis=0))
    labels = {"N": f"N: {params} parameters",
              "C": "training FLOPs C (" + ("the model's count" if has_model_flops else "the table's flops") + ")"}
    plot_loss_vs_compute(points, fit, out / result["plots"]["loss_vs_compute"], flops_model, band, level, labels)
    plot_fit_vs_observed(points, fit, out / result["plots"]["fit_vs_observed"])
    bands = {}
    if samples is not None and budgets.size > 1:
        for approach in ("approach3", "approach2"):
            if approach in samples and samples[approach]["n_opt"].size:
                bands[approach] = tuple(interval(samples[approach]["n_opt"], level))
    plot_n_opt(fit, flops_model, budgets, out / result["plots"]["n_opt_vs_compute"], iso, bands, level, labels)
    if iso is not None:
        plot_isoflop(points, iso, out / result["plots"]["isoflop"], labels)
    result["report"] = "report.md"
    # allow_nan=False: fit.json stays strict JSON that any reader accepts.
    result = _finite(result)
    (out / "fit.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text(report_markdown(result))
    return result


def _finite(value: Any) -> Any:
    """Non-finite numbers (an optimum of a degenerate fit beyond float range) as None: fit.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _column_sum(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    if not rows or key not in rows[0]:
        return None
    values = [float(r[key]) for r in rows if str(r.get("status")) == "done" and str(r.get(key, "")).strip()]
    return sum(values) if values else None


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else f"{value:{fmt}}"


def _fmt_ci(value: float | None, bounds: list | None, fmt: str = ".3g") -> str:
    return _num(value, fmt) + (f" [{_num(bounds[0], fmt)}, {_num(bounds[1], fmt)}]" if bounds else "")


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The fit as printed lines (CLI and report): coefficients, compute-optimal tables of both approaches, LR, compute
    saved; intervals in brackets where bootstrapped."""
    ci = result.get("intervals", {})
    level = result.get("bootstrap", {}).get("level")
    lines = [f"N = {result['definitions']['params']}; C = {result['definitions']['compute']}",
             f"Approach 3: L(N, D) = E + A / N^alpha + B / D^beta  ({result['n_points']} runs, rms log residual "
             f"{result['rms_log_residual']:.4f})" + (f"; {level:.0%} bootstrap intervals of "
                                                     f"{result['bootstrap']['replicates']} replicates" if level else ""),
             "  " + ", ".join(f"{k} = {_fmt_ci(result[k], ci.get(k), '.4g')}" for k in ("E", "A", "alpha", "B", "beta")),
             f"  N_opt ~ C^{result['n_opt_exponent']:.3f}"]
    header = f"  {'C (FLOPs)':>10} {'N_opt':>26} {'D_opt':>26} {'D/N':>7} {'loss':>24}"

    def table(entries):
        out = [header]
        for p in entries:
            out.append(f"  {p['flops']:>10.3g} {_fmt_ci(p['params'], p.get('params_ci')):>26} "
                       f"{_fmt_ci(p['tokens'], p.get('tokens_ci')):>26} {_num(p['tokens_per_param'], '.3g'):>7} "
                       f"{_fmt_ci(p['loss'], p.get('loss_ci'), '.4f'):>24}")
        return out

    lines += table(result["compute_optimal"])
    two = result.get("approach2")
    if two and "a" in two:
        lines.append(f"Approach 2 (isoFLOP parabolas): N_opt ~ C^{_fmt_ci(two['a'], two.get('a_ci'))}, "
                     f"D_opt ~ C^{_fmt_ci(two['b'], two.get('b_ci'))}")
        for m in two["minima"]:
            lines.append(f"  minimum at C = {m['flops']:.3g}: N = {m['params']:.3g}, D = {m['tokens']:.3g} "
                         f"({m['tokens_per_param']:.3g} tokens/param), loss {m['loss']:.4f}"
                         + ("" if m["within_sizes_run"] else "  (outside the sizes run: extrapolated)"))
        lines += table(two["compute_optimal"])
    elif two:
        lines.append(f"Approach 2: not fitted ({two['not_fitted']})")
    lr = result.get("learning_rate")
    if lr:
        lines.append("best LR per size: " + ", ".join(f"N {_human(b['params'])}: {b['lr']:g}" for b in lr["best_lr"])
                     + (f"; lr_opt = {lr['power_law']['c']:.3g} N^{lr['power_law']['g']:.3f}"
                        if "power_law" in lr else ""))
    spent = result.get("compute_spent")
    if spent:
        lines.append(f"compute: {spent['flops_spent']:.3g} FLOPs spent vs {spent['flops_independent_runs']:.3g} for "
                     f"independent runs ({spent['saved_fraction']:.0%} saved by WSD branches)")
    return lines


def report_markdown(result: dict[str, Any]) -> str:
    """report.md: the summary and every plot, side by side with the files it describes."""
    plots = "\n\n".join(f"### {name.replace('_', ' ')}\n\n![{name}]({file})" for name, file in result["plots"].items())
    return (f"# Scaling-law fit of {result['source']}\n\n```\n" + "\n".join(summary_lines(result)) + "\n```\n\n"
            f"Numbers in brackets are bootstrap intervals (fit.json has every value).\n\n## Plots\n\n{plots}\n")
