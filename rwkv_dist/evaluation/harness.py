"""Running lm-eval tasks on an RWKVDistLM: task lookup (local folders, lm-eval's own tasks, the `rwkv-paper` preset),
lm-eval's standard results files, and one-line errors for unknown tasks and datasets missing on this machine."""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import yaml

from ..errors import ConfigError, DataError

PAPER_FILE = Path(__file__).with_name("rwkv_paper.yaml")
PAPER_PRESET = "rwkv-paper"


def paper_suite() -> dict:
    """{"tasks": [lm-eval task names], "official": {checkpoint: {task: {metric: percent or perplexity}}}}."""
    return yaml.safe_load(PAPER_FILE.read_text())


def expand_tasks(tasks: list[str]) -> list[str]:
    names: list[str] = []
    for task in tasks:
        for name in paper_suite()["tasks"] if task == PAPER_PRESET else [task]:
            if name and name not in names:
                names.append(name)
    if not names:
        raise ConfigError("lm-eval: no tasks given")
    return names


def task_manager(names: list[str], include_path: list[str | Path] | None = None):
    """lm-eval's TaskManager over the include paths, and over lm-eval's own tasks only when a name needs them
    (indexing lm-eval's ~200 task folders takes seconds)."""
    paths = tuple(str(Path(p).resolve()) for p in include_path or [])
    for p in paths:
        if not Path(p).is_dir():
            raise ConfigError(f"--include-path {p}: no such folder")
    if paths:
        local = _manager(paths, False)
        if all(n in local.all_tasks for n in names):
            return local
    manager = _manager(paths, True)
    unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
    if unknown:
        where = "lm-eval 0.4.13's tasks" + (f" or {', '.join(paths)}" if paths else " (local tasks: --include-path DIR)")
        raise ConfigError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not in {where}")
    return manager


@functools.lru_cache(maxsize=8)
def _manager(paths: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    with quiet():
        return TaskManager(include_path=list(paths) or None, include_defaults=include_defaults)


@contextlib.contextmanager
def quiet():
    """lm-eval's and datasets' warnings while tasks are looked up and built (defaults it fills in for task YAMLs)."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


# a local data file that is not there; a hub dataset that is neither cached nor reachable (offline, no network)
DATASET_ERRORS = (FileNotFoundError, ConnectionError)


def load_tasks(manager, names: list[str]) -> list:
    """The Task / Group objects of `names`, datasets loaded: a missing dataset stops here, naming its task."""
    built = []
    for name in names:
        try:
            with quiet():
                obj = manager._load_spec(name)  # lm-eval 0.4.13; what TaskManager.load does for each name
        except DATASET_ERRORS as e:
            raise DataError(f"task {name}: its dataset is not on this machine: {_first_line(e)}") from None
        built.extend(obj if isinstance(obj, list) else [obj])
    return built


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def run_tasks(lm, tasks: list[str], include_path: list[str | Path] | None = None, num_fewshot: int | None = None,
              limit: int | float | None = None, log_samples: bool = False, output_path: str | Path | None = None,
              model_name: str | None = None, bootstrap_iters: int = 100_000, manager=None, loaded=None) -> dict:
    """lm-eval's simple_evaluate on `lm`; with output_path, lm-eval's results JSON (and samples JSONL) are written
    there as its own command line writes them (OUT/<model name>/results_<date>.json)."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    names = expand_tasks(tasks)
    manager = manager or task_manager(names, include_path)
    loaded = loaded or load_tasks(manager, names)
    tracker = EvaluationTracker(output_path=str(output_path)) if output_path else None
    results = simple_evaluate(model=lm, model_args={"pretrained": model_name} if model_name else None,
                              tasks=loaded, num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
                              task_manager=manager, evaluation_tracker=tracker, bootstrap_iters=bootstrap_iters)
    if tracker is not None:
        samples = results.pop("samples", None) if log_samples else None
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"] if samples else []:
            tracker.save_results_samples(task_name=task, samples=samples[task])
        if samples is not None:
            results["samples"] = samples
    return results


def paper_comparison(results: dict) -> str:
    """Our scores on the paper's tasks beside the official RWKV-4 checkpoints' documented figures."""
    suite = paper_suite()
    official = suite["official"]
    sizes = [name.split("-")[3] for name in official]  # RWKV-4-Pile-169M-... -> 169M
    rows = [["task", "metric", "this model", *sizes]]
    for task in suite["tasks"]:
        scores = results.get("results", {}).get(task)
        if scores is None:
            continue
        metrics = sorted({m for card in official.values() for m in card.get(task, {})}) or \
            [k.split(",")[0] for k in scores if k.endswith(",none") and "_stderr" not in k]
        for metric in metrics:
            ours = scores.get(f"{metric},none")
            shown = "-" if ours is None else f"{ours:.2f}" if metric == "perplexity" else f"{100 * ours:.2f}"
            rows.append([task, metric, shown, *[str(card.get(task, {}).get(metric, "-")) for card in official.values()]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines + [f"(official figures: model cards of the RWKV-4 Pile checkpoints, percent; see {PAPER_FILE})"])


def lm_eval_command(checkpoint: str, tasks: str, tokenizer: str | None = None, include_path: list[str] | None = None,
                    num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 8,
                    output_path: str | None = None, log_samples: bool = False, device: str | None = None) -> dict:
    """`rwkv-dist lm-eval`: finds the tasks and their datasets first, then loads the checkpoint and runs them."""
    from lm_eval.utils import make_table

    from .backend import RWKVDistLM

    names = expand_tasks([t.strip() for t in tasks.split(",")])
    manager = task_manager(names, include_path)  # unknown tasks and missing datasets stop before the checkpoint is read
    loaded = load_tasks(manager, names)
    limit = int(limit) if limit is not None and limit >= 1 else limit
    lm = RWKVDistLM(pretrained=checkpoint, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = run_tasks(lm, names, include_path, num_fewshot, limit, log_samples, output_path, model_name=checkpoint,
                        manager=manager, loaded=loaded)
    print(make_table(results))
    if PAPER_PRESET in [t.strip() for t in tasks.split(",")]:
        print(paper_comparison(results))
    if output_path:
        written = sorted(Path(output_path).rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
        print(f"wrote {written[-1] if written else output_path}")
    return results
