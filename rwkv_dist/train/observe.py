"""What a run reports, on rank 0: TensorBoard scalars, one JSON line per step, progress, and a final summary.

MFU = training FLOPs per token (3 x the forward's, from the model's shapes) x tokens/s / (ranks x peak FLOP/s per
device); the peak comes from `hardware.detect_peak_flops` or the config's `logging.peak_flops`.

metrics.jsonl is append-only and chronological. Each (re)start of the run and each rollback first writes a marker
`{"event": "start" | "resume" | "rollback", "from_step": S, ...}`; the steps after S that earlier lines recorded were
discarded and are computed again. `read_metrics` applies the markers and returns each step's record exactly once (the
one of the timeline the run kept); use it, not a plain line reader. TensorBoard is told the same (purge_step).

Progress: a live bar on a terminal; otherwise (Ray workers, batch jobs, pipes) one plain line every
`logging.every_steps` steps or 10 s, whichever comes first, flushed at once so it reaches the driver's log.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

PLAIN_PROGRESS_SECONDS = 10.0


def memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss


def read_metrics(path: str | Path) -> list[dict]:
    """The run's records in step order as the run kept them: per-step records (with "loss") and validation records
    (with "val_loss"), without the ones a resume or rollback discarded."""
    kept: list[dict] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "event" in record:
            kept = [r for r in kept if r["step"] <= record["from_step"]]
        else:
            kept.append(record)
    return kept


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Reporter:
    """Rank 0's outputs; on other ranks every method is a no-op."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, first_step: int, every_steps: int = 10,
                 resumed: bool = False, interactive: bool | None = None):
        self.enabled = enabled
        self.out_dir, self.total_steps, self.every_steps = out_dir, total_steps, every_steps
        self.writer = self.metrics = self.progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(out_dir / "metrics.jsonl", "a")
        self._open_writer(first_step)
        self.restart(first_step, "resume" if resumed else "start", reopen=False)
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        if self.interactive:
            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TextColumn("ETA"), TimeRemainingColumn())
            self.task = self.progress.add_task("", total=total_steps, completed=first_step, info="")
            self.progress.start()
        self._plain_step, self._plain_time = first_step, time.time()
        self._rate_start = (first_step, time.time())

    def _open_writer(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # events of steps after `step` written before a resume or rollback are dropped from the view
        self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=step + 1)

    def restart(self, step: int, event: str, reopen: bool = True) -> None:
        """The run goes on from `step`: records of later steps already written are superseded."""
        if not self.enabled:
            return
        self.record({"event": event, "from_step": step, "time": time.time()})
        if reopen:
            self.writer.close()
            self._open_writer(step)
            self._rate_start = (step, time.time())

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(message)
        else:
            from rich.text import Text

            print(Text.from_markup(message).plain, flush=True)

    def record(self, record: dict) -> None:
        if self.enabled:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def step(self, record: dict, write_scalars: bool) -> None:
        if not self.enabled:
            return
        self.record(record)
        step = record["step"]
        info = f"loss {record['loss']:.3f}  {record['tokens_per_s']:,.0f} tok/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif (step - self._plain_step >= self.every_steps or time.time() - self._plain_time >= PLAIN_PROGRESS_SECONDS
              or step == self.total_steps):
            first, since = self._rate_start
            rate = (step - first) / max(time.time() - since, 1e-9)
            eta = _duration((self.total_steps - step) / rate) if rate > 0 else "?"
            print(f"step {step}/{self.total_steps}  {info}  ETA {eta}", flush=True)
            self._plain_step, self._plain_time = step, time.time()
        if write_scalars:
            self.scalars(step, {
                "train/loss": record["loss"], "train/lr": record["lr"], "train/grad_norm": record["grad_norm"],
                "perf/tokens_per_s": record["tokens_per_s"], "perf/mfu": record["mfu"],
                "perf/memory_gb": record["memory_bytes"] / 2**30, "guard/skipped_steps": record["skipped_steps"],
                "guard/rollbacks": record["rollbacks"], "guard/loss_spikes": record["loss_spikes"],
                "train/tokens": record["tokens"]})

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if not self.enabled:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self, summary: dict | None = None) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        self.writer.close()
        self.metrics.close()
        if summary:
            from rich.console import Console
            from rich.table import Table

            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            table = Table(title="run summary", show_header=False)
            for key, value in summary.items():
                table.add_row(key, f"{value:,.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int)
                              else str(value))
            Console().print(table)
