"""In-training downstream evaluation (the run config's `eval` section): a 2-rank ZeRO-3 run scores the local lm-eval
tasks on its current weights, sharded over the ranks; the scores equal `rwkv-dist lm-eval` on the same checkpoint; a
run with evals, SIGKILLed and resumed, trains bitwise as the one without (the session's `runs["zero3"]`)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from helpers import TRAIN_WORKER, kill_all_at_step, launch, losses, raw_records, run_cli, tiny, train, weights

from rwkv_dist.config import load_run_config
from rwkv_dist.errors import ConfigError
from rwkv_dist.train.observe import read_metrics

TASKS = "tests/lm_eval_tasks"  # its data_files are relative to the repository root, the tests' working directory
EVAL = ["eval.tasks=[rwkv_dist_mc,rwkv_dist_ppl]", "eval.every_steps=2", f"eval.include_path={TASKS}"]


def test_evals_score_as_offline_and_a_killed_resumed_run_trains_as_without_them(runs, data, tmp_path, repo):
    run = tmp_path / "evals"
    proc = subprocess.Popen(launch(tiny(data, run, 2, *EVAL), 2, TRAIN_WORKER), cwd=repo, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    killed_at = kill_all_at_step(proc, run, 3)  # step 3 runs after the eval of step 2
    assert 3 <= killed_at < 6, killed_at
    assert any("eval" in r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()))
    train(data, run, 2, *EVAL, script=TRAIN_WORKER)  # checkpoint.resume defaults to auto

    reference = losses(runs["zero3"])  # the same run without evals
    assert losses(run) == reference  # bitwise
    assert all(r["loss"] == reference[r["step"]] for r in raw_records(run))  # also the steps the kill discarded
    w_a, w_b = weights(runs["zero3"]), weights(run)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)

    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    # sharded by document: 24 questions x 4 choices + 8 documents, half on each rank
    assert all(r["eval_requests_per_rank"] == [52, 52] for r in evals)
    final = evals[-1]["eval"]
    assert set(final) == {"rwkv_dist_mc/acc", "rwkv_dist_mc/acc_norm", "rwkv_dist_ppl/word_perplexity",
                          "rwkv_dist_ppl/byte_perplexity", "rwkv_dist_ppl/bits_per_byte"}

    out = tmp_path / "offline"
    done = run_cli("lm-eval", run, "--tasks", "rwkv_dist_mc,rwkv_dist_ppl", "--include-path", TASKS, "--output-path", out)
    assert done.returncode == 0, done.stderr[-3000:]
    offline = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert final == {f"{task}/{metric}": offline[task][f"{metric},none"]
                     for task, metric in (k.split("/") for k in final)}  # the same floats

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    for key in final:
        events = acc.Scalars(f"eval/{key}")
        assert [e.step for e in events] == [2, 4, 6]
        assert [e.value for e in events] == pytest.approx([r["eval"][key] for r in evals], rel=1e-6)

    for path in sorted((run / "collectives").glob("rank_*.json")):  # the resumed process of each rank
        seen = json.loads(path.read_text())
        assert "all_gather_object" in {c["op"] for c in seen["calls"]}
        assert all(c["file"] == "train/distributed.py" for c in seen["calls"])


def config(data: str, tmp_path, *overrides: str):
    args = tiny(data, tmp_path / "run", 1, *overrides)
    return load_run_config(args[0], args[1:])


@pytest.mark.parametrize("override, message", [
    ("eval.limit=0", "eval.limit: a count of documents >= 1 or a fraction in (0, 1), got 0"),
    ("eval.limit=2.5", "eval.limit: a count of documents >= 1 or a fraction in (0, 1), got 2.5"),
    ("eval.every_steps=-1", "eval.every_steps: Input should be greater than or equal to 0 (got -1)"),
    ("eval.tasks=['', rwkv_dist_mc]", "eval.tasks: an empty task name in ['', 'rwkv_dist_mc']"),
    ("eval.task=[rwkv_dist_mc]", "eval.task: unknown field"),
])
def test_bad_eval_settings_are_one_line_config_errors(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        config("unused", tmp_path, override)
    assert str(e.value).endswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["eval.tasks=[rwkv_dist_mc]", f"eval.include_path=[{TASKS}, tests/no_such_tasks]"],
     "eval.include_path: tests/no_such_tasks: no such folder"),
    (["eval.tasks=[rwkv_dist_missing]", f"eval.include_path={TASKS}"],
     "eval.tasks: task rwkv_dist_missing: its dataset is not on this machine"),
    (["eval.tasks=[rwkv_dist_mc]", f"eval.include_path={TASKS}", "parallel.strategy=pipeline",
      "parallel.pipeline_stages=2"], "eval.tasks is not supported with strategy pipeline yet"),
    (["eval.tasks=[rwkv_dist_mc,no_such_task]", f"eval.include_path={TASKS}"],
     "eval.tasks: unknown task no_such_task: not in lm-eval 0.4.13's tasks or"),
])
def test_eval_tasks_are_checked_before_training_starts(data, tmp_path, monkeypatch, overrides, message):
    """The trainer stops before it forms a process group or writes anything."""
    from rwkv_dist.train.trainer import Trainer

    monkeypatch.setenv("WORLD_SIZE", "2" if "parallel.strategy=pipeline" in overrides else "1")
    with pytest.raises(ConfigError) as e:
        Trainer(config(data, tmp_path, *overrides), source="run.yaml")
    text = str(e.value)
    assert text.startswith("run.yaml: ") and message in text and "\n" not in text, text
    assert not (tmp_path / "run").exists()
