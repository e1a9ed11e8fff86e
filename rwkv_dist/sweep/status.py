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
        if "loss" in record and "step" in record:
            return record
    return None


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def status_rows(out_dir: str | Path) -> tuple[list[dict], dict | None]:
    """(one dict per run: run, role, status, step, total, loss, eta; the driver's heartbeat record or None)."""
    out = Path(out_dir)
    plan_file = out / PLAN
    if not plan_file.is_file():
        raise ConfigError(f"{out}: not a sweep folder (no {PLAN}; has the sweep been started?)")
    runs = [Run.model_validate(r) for r in json.loads(plan_file.read_text())["runs"]]
    driver = json.loads((out / DRIVER).read_text()) if (out / DRIVER).is_file() else None
    alive = driver is not None and time.time() - driver["time"] < HEARTBEAT_S
    running = set(driver["running"]) if alive else set()
    rows = []
    for run in runs:
        result = json.loads((run.out_dir / RESULT).read_text()) if (run.out_dir / RESULT).is_file() else None
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
