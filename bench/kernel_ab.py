"""Two builds of the CPU kernels timed side by side in one process: a baseline revision's csrc/ against the working
tree's, their calls alternating, on the shapes of a ctx-8192 training step (L4 D256 V2048, bench/train_throughput.py)
and of bench/wkv_cpu.py.

    .venv/bin/python bench/kernel_ab.py [--baseline HEAD] [--rounds 21] [--threads N]

Why: on a shared VM a kernel's time moves by 10-30% from one minute to the next, more than most kernel changes, so two
separate runs cannot tell a 5% change from noise. Here every round times the baseline's call and the working tree's
call back to back (in alternating order), and the ratio of the medians is what is compared. Each build is an
extension module of its own (rwkv_dist.ops._build.build_cpu_kernels; the baseline's sources come from `git archive`
into .cache/kernel_ab/), with the flags the trainer's build uses (-march from RWKV_DIST_WKV_CPU_MARCH, default
native). Prints per op: both medians, working / baseline, and whether their outputs are bitwise equal (a change that
only moves work around should keep them equal). Ops the baseline does not have are skipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from rwkv_dist.ops._build import CPU_SOURCES, CSRC, build_cpu_kernels  # noqa: E402
from rwkv_dist.train.hardware import keep_freed_cpu_memory  # noqa: E402


def baseline_sources(revision: str) -> tuple[Path, str]:
    """csrc/ of `revision`, unpacked once into .cache/kernel_ab/<commit>/ -> (folder, short commit)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{revision}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode != 0:
        sys.exit(f"kernel_ab: --baseline {revision!r} is not a commit of {ROOT}")
    short = commit.stdout.strip()[:12]
    folder = ROOT / ".cache" / "kernel_ab" / short
    if not folder.is_dir():  # unpacked beside it and renamed, so an interrupted unpack is never taken for a whole one
        partial = folder.with_name(short + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", short, "csrc"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(partial)], input=archive.stdout, check=True)
        partial.rename(folder)
    return folder / "csrc", short


def operations(generator: torch.Generator):
    """(name, shape, kernel op names it needs, fn(ext) -> outputs) on fixed inputs."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    def wkv(B, T, C):
        w, u = -torch.rand(C, generator=generator).exp(), randn(C)
        k, v, gy = randn(B, T, C), randn(B, T, C), randn(B, T, C)
        s0 = torch.stack((torch.zeros(B, C), torch.zeros(B, C), torch.full((B, C), -1e38)))
        g_last = torch.zeros(3, B, C)

        def run(ext):
            y, state, checkpoints = ext.forward(w, u, k, v, s0, True)
            return (y, state, *ext.backward(w, u, k, v, gy, checkpoints, state, g_last))
        return run

    x, mu3, mu2 = randn(1, 8192, 256), torch.rand(3, 256, generator=generator), torch.rand(2, 256, generator=generator)
    g3, g2 = [randn(1, 8192, 256) for _ in range(3)], [randn(1, 8192, 256) for _ in range(2)]
    hidden, g_hidden = randn(8192, 1024), randn(8192, 1024)
    r, y, g = randn(8192, 256), randn(8192, 256), randn(8192, 256)
    logits, targets = randn(8192, 2048), torch.randint(0, 2048, (8192,), generator=generator)
    return [
        ("WKV fwd+bwd", "B1 T8192 C256", "forward", wkv(1, 8192, 256)),
        ("WKV fwd+bwd", "B8 T1024 C512", "forward", wkv(8, 1024, 512)),
        ("shift-mix fwd, 3 mixes", "1x8192x256", "mix_forward", lambda e: e.mix_forward(x, None, mu3)),
        ("shift-mix bwd, 3 mixes", "1x8192x256", "mix_backward", lambda e: e.mix_backward(x, None, mu3, g3)),
        ("shift-mix bwd, 2 mixes", "1x8192x256", "mix_backward", lambda e: e.mix_backward(x, None, mu2, g2)),
        ("squared ReLU fwd", "8192x1024", "squared_relu_forward", lambda e: e.squared_relu_forward(hidden)),
        ("squared ReLU bwd", "8192x1024", "squared_relu_backward", lambda e: e.squared_relu_backward(hidden, g_hidden)),
        ("sigmoid gate fwd", "8192x256", "sigmoid_gate_forward", lambda e: e.sigmoid_gate_forward(r, y)),
        ("sigmoid gate bwd", "8192x256", "sigmoid_gate_backward", lambda e: e.sigmoid_gate_backward(r, y, g)),
        ("cross-entropy fwd", "8192x2048", "cross_entropy_forward", lambda e: e.cross_entropy_forward(logits, targets)),
        ("cross-entropy bwd", "8192x2048", "cross_entropy_backward", cross_entropy_backward(logits, targets)),
    ]


def cross_entropy_backward(logits: torch.Tensor, targets: torch.Tensor):
    saved = {}  # each build's own forward results, computed once outside the timing

    def run(ext):
        if id(ext) not in saved:
            saved[id(ext)] = ext.cross_entropy_forward(logits, targets)[1:]
        return ext.cross_entropy_backward(logits, targets, *saved[id(ext)], 1 / 8192, 1e-4 / 8192)
    return run


def flat(outputs) -> list[torch.Tensor]:
    return [outputs] if isinstance(outputs, torch.Tensor) else [t for o in outputs for t in flat(o)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision whose csrc/ is the baseline (default HEAD)")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads; default: this process's cores")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_cpu_memory()  # the trainer's allocator setting: fresh outputs must not page-fault in every call
    march = os.environ.get("RWKV_DIST_WKV_CPU_MARCH", "native")
    baseline_dir, short = baseline_sources(args.baseline)
    older = tuple(source for source in CPU_SOURCES if (baseline_dir / source).exists())  # files added since are left out
    builds = {"baseline": build_cpu_kernels(baseline_dir, f"kernel_ab_{short}", march, sources=older),
              "working": build_cpu_kernels(CSRC, "kernel_ab_working", march)}

    print(f"CPU kernels, baseline {args.baseline} ({short}) vs the working tree, -march={march}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} alternating rounds (ms)")
    print(f"{'op':26s}{'shape':>15s}{'baseline':>10s}{'working':>9s}{'ratio':>8s}  bitwise equal")
    for name, shape, needs, fn in operations(torch.Generator().manual_seed(0)):
        if not all(hasattr(ext, needs) for ext in builds.values()):
            print(f"{name:26s}{shape:>15s}  (not in the baseline)")
            continue
        outputs = {label: flat(fn(ext)) for label, ext in builds.items()}  # also the warm-up
        equal = all(torch.equal(a, b) for a, b in zip(outputs["baseline"], outputs["working"]))
        times = {label: [] for label in builds}
        for i in range(args.rounds):
            for label in (("baseline", "working") if i % 2 == 0 else ("working", "baseline")):
                start = time.perf_counter()
                fn(builds[label])
                times[label].append(time.perf_counter() - start)
        base, work = (statistics.median(times[label]) * 1e3 for label in ("baseline", "working"))
        print(f"{name:26s}{shape:>15s}{base:10.2f}{work:9.2f}{work / base:7.3f}x  {'yes' if equal else 'NO'}")


if __name__ == "__main__":
    main()
