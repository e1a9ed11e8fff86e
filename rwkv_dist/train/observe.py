"""What a run reports, on rank 0: TensorBoard scalars, one JSON line per step, a progress bar, and a final summary.

MFU = training FLOPs per token (3 x the forward's, from the model's shapes) x tokens/s / (ranks x peak FLOP/s per
device). The peak is the config's `logging.peak_flops`, else the GPU's datasheet bf16 dense peak, else (CPU) a matmul
measured at start-up in the run's precision, labelled as measured.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# bf16 dense peaks (datasheets), matched against torch.cuda.get_device_name()
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12,
                  "V100": 125e12, "4090": 165e12, "3090": 71e12}


def detect_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_FLOPS.items():
            if key in name:
                return peak, f"datasheet {name}"
    n = 512
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.25:
        a @ b
        calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * calls / (time.perf_counter() - start), f"measured {n}x{n} {str(dtype).removeprefix('torch.')} matmul"


def memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss


class Reporter:
    """Rank 0's outputs; on other ranks every method is a no-op."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, first_step: int):
        self.enabled = enabled
        self.total_steps = total_steps
        self.writer = self.metrics = self.progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from torch.utils.tensorboard import SummaryWriter

        out_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(out_dir / "tensorboard"))
        self.metrics = open(out_dir / "metrics.jsonl", "a")
        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                 TextColumn("ETA"), TimeRemainingColumn())
        self.task = self.progress.add_task("", total=total_steps, completed=first_step, info="")
        self.progress.start()

    def print(self, message: str) -> None:
        if self.enabled:
            self.progress.console.print(message)

    def record(self, record: dict) -> None:
        if self.enabled:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def step(self, record: dict, write_scalars: bool) -> None:
        if not self.enabled:
            return
        self.record(record)
        info = f"loss {record['loss']:.3f}  {record['tokens_per_s']:,.0f} tok/s"
        self.progress.update(self.task, completed=record["step"], info=info)
        if write_scalars:
            self.scalars(record["step"], {
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
        self.progress.stop()
        self.writer.close()
        self.metrics.close()
        if summary:
            from rich.console import Console
            from rich.table import Table

            table = Table(title="run summary", show_header=False)
            for key, value in summary.items():
                table.add_row(key, f"{value:,.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int)
                              else str(value))
            Console().print(table)
