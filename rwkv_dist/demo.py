"""The demo: the embedded corpus through the real data path into DeepSpeed ZeRO-3 training on 2 Ray workers (CPU).

    corpus (builtin:stdlib) -> sentencepiece tokenizer -> WebDataset shards + manifest
      -> rwkv-dist launch --workers 2: Ray Train workers running the trainer (ZeRO-3, bf16, TensorBoard, checkpoints)
      -> validation loss and a sample generated in recurrent mode from the last checkpoint
"""

from __future__ import annotations

import math
from pathlib import Path

from .data import BUILTIN, CorpusStats, Tokenizer, expand_inputs, read_documents, train_tokenizer, write_shards

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def prepare_data(out: Path, vocab_size: int = 2048) -> tuple[Tokenizer, str]:
    """Tokenizer and shards of the embedded corpus under `out` (built once, reused after)."""
    files = expand_inputs([BUILTIN])
    if not (out / "tokenizer" / "tokenizer.model").exists():
        print(f"training a {vocab_size}-token sentencepiece tokenizer on {len(files)} standard-library files ...")
        train_tokenizer(read_documents(files), out / "tokenizer", vocab_size=vocab_size)
    tokenizer = Tokenizer(out / "tokenizer")
    if not (out / "data" / "manifest.json").exists():
        print("writing WebDataset shards ...")
        stats = CorpusStats()
        write_shards(read_documents(files, stats=stats), tokenizer, out / "data", stats, shard_tokens=100_000,
                     val_fraction=0.03)
    return tokenizer, str(out / "data")


def run_demo(out: str | Path = "runs/demo", overrides: list[str] | None = None, workers: int = 2,
             config: Path = DEMO_CONFIG) -> dict:
    """Train the demo run with `workers` processes; returns {"first", "last" (mean of the last 20), "val", "steps"}."""
    out = Path(out)
    tokenizer, location = prepare_data(out)
    run_dir = out / "train"
    args = [str(config), f"out_dir={run_dir}", f"data.sources=[{{location: {location}}}]", f"data.val={location}",
            f"model.vocab_size={tokenizer.vocab_size}", *(overrides or [])]
    from .orchestrate import launch, plan_launch

    plan, cfg = plan_launch(str(config), args[1:], workers, address="local", max_failures=1)
    print(f"training with DeepSpeed ZeRO-3 on {workers} Ray Train workers (a local Ray instance):\n{plan.describe(cfg)}",
          flush=True)
    launch(plan, cfg)
    from .train.observe import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in records if r.get("applied")]
    val = [r["val_loss"] for r in records if "val_loss" in r][-1]
    last = sum(losses[-20:]) / len(losses[-20:])
    from .inference import load_model, sample

    model, tok = load_model(run_dir)
    print(f"train loss {losses[0]:.3f} -> {last:.3f} (mean of the last 20); val loss {val:.3f} (perplexity "
          f"{math.exp(val):.1f}; uniform would be {math.log(tokenizer.vocab_size):.2f})")
    print(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    print("sample (recurrent mode, from the last checkpoint):\ndef " + sample(model, tok, "def ", 120))
    return {"first": losses[0], "last": last, "val": val, "steps": records[-1]["step"]}
