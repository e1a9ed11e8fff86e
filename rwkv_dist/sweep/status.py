"""Where a sweep stands, read from its folder alone (`rwkv-dist sweep-status OUT`, and the driver's live table).

Per run: status (done / failed / running / interrupted / waiting / pending), step/total, the latest loss and an ETA
from the run's own throughput. Everything comes from files the runs and the driver write (plan.json, driver.json,
each run's sweep_result.json, metrics.jsonl, checkpoints, branch points), so it works with the driver alive, dead or
on another machine that sees the same storage.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from pydantic import ValidationError

from ..config import describe
from ..errors import ConfigError
from ..train.checkpoint import COMPLETE, CheckpointStore, step_name
from .runner import BRANCH_POINTS, DRIVER, PLAN, RESULT, Run

HEARTBEAT_S = 120.0  # a driver silent this long is taken for dead


def _last_step(metrics: Path) -> dict | None:
    """The newest per-step record of a metrics.jsonl (read from its end: the file grows with the run)."""
    if not metrics.is_file():
        return None
    with metrics.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(size - 8192, 0))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        # a line the run did not write (or cut by a crash) is skipped: the table formats step and loss as numbers
        if isinstance(record, dict) and isinstance(record.get("loss"), (int, float)) \
                and isinstance(record.get("step"), int):
            return record
    return None


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _read_json(path: Path):
    """A JSON file the sweep wrote (atomically); damaged or hand-edited, it is named in one line, not a traceback."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: JSON syntax, or bytes that are not UTF-8
        raise ConfigError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def status_rows(out_dir: str | Path) -> tuple[list[dict], dict | None]:
    """(one dict per run: run, role, status, step, total, loss, eta; the driver's heartbeat record or None)."""
    out = Path(out_dir)
    plan_file = out / PLAN
    if not plan_file.is_file():
        raise ConfigError(f"{out}: not a sweep folder (no {PLAN}; has the sweep been started?)")
    plan = _read_json(plan_file)
    try:
        runs = [Run.model_validate(r) for r in plan["runs"]]
    except (TypeError, KeyError, ValidationError) as e:
        reason = describe(e) if isinstance(e, ValidationError) else "expected {\"runs\": [...]}"
        raise ConfigError(f"{plan_file}: not a sweep plan ({reason})") from None
    driver = _read_json(out / DRIVER) if (out / DRIVER).is_file() else None
    if driver is not None and not (isinstance(driver, dict) and isinstance(driver.get("time"), (int, float))
                                   and isinstance(driver.get("running"), list)):
        raise ConfigError(f"{out / DRIVER}: not a sweep driver record (expected time and running)")
    alive = driver is not None and time.time() - driver["time"] < HEARTBEAT_S
    running = set(driver["running"]) if alive else set()
    rows = []
    for run in runs:
        result = _read_json(run.out_dir / RESULT) if (run.out_dir / RESULT).is_file() else None
        if result is not None and not (isinstance(result, dict) and "status" in result):
            raise ConfigError(f"{run.out_dir / RESULT}: not a sweep result (no status)")
        last = _last_step(run.out_dir / "metrics.jsonl")
        step = last["step"] if last else run.start_step
        row = {"run": run.name, "role": run.role, "step": step, "total": run.steps,
               "loss": last["loss"] if last else None, "eta": None, "note": ""}
        if result is not None and run.name not in running:
            row["status"] = result["status"]
            row["note"] = result.get("error", "")
            if result["status"] == "done":
                row["step"], row["eta"] = run.steps, 0.0
        elif run.name in running:
            row["status"] = "running"
            if last and last.get("tokens_per_s"):
                row["eta"] = (run.steps - step) * run.tokens_per_step / last["tokens_per_s"]
        elif CheckpointStore(run.out_dir / "checkpoints").committed():
            row["status"] = "interrupted"
        elif run.role == "branch" and not (run.out_dir.parent / run.parent / BRANCH_POINTS / step_name(run.start_step)
                                           / COMPLETE).is_file():
            row["status"] = "waiting"
            row["note"] = f"for {run.parent}"
        else:
            row["status"] = "pending"
        if run.role == "constant":
            kept = sum((run.point(s) / COMPLETE).is_file() for s in run.segments)
            row["note"] = row["note"] or f"{kept}/{len(run.segments)} branch points"
        rows.append(row)
    return rows, driver if alive else None


def render_status(out_dir: str | Path) -> str:
    """The status table as text (rich's rendering, no colours: it goes to logs as often as to terminals)."""
    from rich.console import Console
    from rich.table import Table

    rows, driver = status_rows(out_dir)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "running", "failed")}
    title = (f"{out_dir}: {counts['done']}/{len(rows)} done, {counts['running']} running, {counts['failed']} failed; "
             + (f"driver pid {driver['pid']}" if driver else "no driver running"))
    table = Table(title=title, title_justify="left")
    for column in ("run", "role", "status", "step/total", "loss", "ETA", "note"):
        table.add_column(column, justify="right" if column in ("step/total", "loss", "ETA") else "left")
    for r in rows:
        table.add_row(r["run"], r["role"], r["status"], f"{r['step']}/{r['total']}",
                      f"{r['loss']:.4f}" if r["loss"] is not None else "", _eta(r["eta"]), r["note"][:80])
    console = Console(width=160, no_color=True, force_terminal=False, file=io.StringIO())
    console.print(table)
    return console.file.getvalue().rstrip()
