"""`rwkv-dist`: the command line. Each subcommand validates its arguments before doing any work."""

from __future__ import annotations

import argparse
import json
import math
import sys

from .errors import RWKVDistError


def cmd_info(args: argparse.Namespace) -> None:
    from .info import model_info

    info = model_info(args.config)
    if args.json:
        print(json.dumps(info))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.config}", show_header=False)
    for key, value in info.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    Console().print(table)


def cmd_export(args: argparse.Namespace) -> None:
    from pathlib import Path

    import torch

    from .data import Tokenizer
    from .export import check_export_out, export_file, export_state_dict

    check_export_out(args.format, args.out)  # before consolidating a checkpoint, which can take minutes
    dtype = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer and args.format == "hf" else None
    if Path(args.src).is_dir():  # a training checkpoint (step folder or run folder); its tokenizer is saved with it
        from .train.weights import checkpoint_weights

        sd, cfg, folder = checkpoint_weights(args.src)
        if args.format == "hf" and tokenizer is None and (folder / "tokenizer.model").is_file():
            tokenizer = Tokenizer(folder / "tokenizer.model")
        out = export_state_dict(sd, args.format, args.out, dtype=dtype, source=str(folder), ctx_len=cfg.model.ctx_len,
                                tokenizer=tokenizer)
        print(f"consolidated {folder} ({cfg.parallel.strategy})")
    else:
        out = export_file(args.src, args.format, args.out, dtype=dtype, tokenizer=tokenizer)
    note = f" with its tokenizer ({tokenizer.path})" if tokenizer else " without a tokenizer (pass --tokenizer)" \
        if args.format == "hf" else ""
    print(f"wrote {args.format} export to {out}{note}")


def _unit_interval(name: str, low_open: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (0 < value <= 1 if low_open else 0 <= value <= 1):
            raise argparse.ArgumentTypeError(f"{name} must be in (0, 1], got {text}")
        return value
    return parse


def _positive(kind, name: str, zero: bool = False):
    """A parser for a positive (with `zero`: non-negative) int or float; floats must be finite (an infinite
    temperature or FLOP budget passes `> 0` and then samples noise or fails deep in the work)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a {'non-negative' if zero else 'positive'} "
                                             f"{kind.__name__}, got {text!r}") from None
        if not (value >= 0 if zero else value > 0):
            raise argparse.ArgumentTypeError(f"{name} must be {'non-negative' if zero else 'positive'}, got {text}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name} must be finite, got {text}")
        return value
    return parse


def cmd_generate(args: argparse.Namespace) -> None:
    from .errors import CheckpointError
    from .inference import load_model, sample_many

    model, tokenizer = load_model(args.checkpoint, args.tokenizer)
    if tokenizer is None:
        raise CheckpointError(f"{args.checkpoint}: a weights file carries no tokenizer; pass --tokenizer")
    texts = sample_many(model, tokenizer, args.prompt, args.max_tokens, args.num_samples, args.temperature, args.top_p,
                        args.seed, weights=args.weights)
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i} (seed {args.seed + i}) ---")
        print(args.prompt + text)


def cmd_eval(args: argparse.Namespace) -> None:
    from .inference import check_eval_data, evaluate, load_model, perplexity

    check_eval_data(args.data, None)
    model, tokenizer = load_model(args.checkpoint, args.tokenizer)
    check_eval_data(args.data, tokenizer)
    ctx_len = args.ctx_len or model.cfg.ctx_len
    loss, tokens = evaluate(model, args.data, ctx_len, args.batch_size, args.max_batches, args.segment_len)
    print(f"val loss {loss:.4f}  perplexity {perplexity(loss):.3f}  ({tokens:,} tokens, ctx {ctx_len})")


def cmd_plan(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from .config import load_run_config
    from .errors import ConfigError
    from .parallel.planner import GPUS, Cluster, assumptions, plan, print_plan

    cfg = load_run_config(args.config, args.overrides)
    if args.gpu not in GPUS:
        raise ConfigError(f"--gpu {args.gpu}: unknown GPU type (known: {', '.join(GPUS)})")
    if args.gpus < 1 or args.gpus_per_node < 1:
        raise ConfigError("--gpus and --gpus-per-node must be at least 1")
    gpu = GPUS[args.gpu]
    cluster = Cluster(args.gpus, min(args.gpus_per_node, args.gpus), gpu, args.gpu_mem or gpu.memory_gb)
    estimates, best = plan(cfg, cluster, args.tensor, args.pipeline, args.zero)
    if args.json:
        print(json.dumps({"recommended": best.row(), "layouts": [dict(e.row(), time_s=e.time_s) for e in estimates],
                          "cluster": asdict(cluster), "assumptions": assumptions()}, indent=1))
    else:
        print_plan(cfg, cluster, estimates, best, args.rows)


def cmd_lm_eval(args: argparse.Namespace) -> None:
    from .evaluation.harness import lm_eval_command

    lm_eval_command(args.checkpoint, args.tasks, args.tokenizer, args.include_path, args.num_fewshot, args.limit,
                    args.batch_size, args.output_path, args.log_samples, args.device)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(out=args.out, overrides=[f"schedule.steps={args.steps}", f"seed={args.seed}"], workers=args.workers)


def cmd_train(args: argparse.Namespace) -> None:
    from .config import load_run_config
    from .errors import ConfigError, check_out_folder
    from .train.distributed import finish
    from .train.trainer import train

    cfg = load_run_config(args.config, args.overrides)
    check_out_folder(cfg.out_dir, f"{args.config}: out_dir", ConfigError)
    train(cfg, source=args.config, resume=args.resume)
    finish()


def cmd_launch(args: argparse.Namespace) -> None:
    from .orchestrate import launch, plan_launch

    plan, cfg = plan_launch(args.config, args.overrides, args.workers, args.cpus_per_worker, args.gpus_per_worker,
                            args.address, args.max_failures)
    print(plan.describe(cfg), flush=True)
    if args.dry_run:
        return
    launch(plan, cfg)
    print(f"run {cfg.name} finished: {plan.out_dir}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from .sweep.runner import run_sweep

    table = run_sweep(args.sweep, address=args.address, dry_run=args.dry_run, status_every=args.status_every)
    if not args.dry_run:
        print(f"results: {table}")


def cmd_sweep_status(args: argparse.Namespace) -> None:
    from .sweep.status import render_status

    print(render_status(args.out))


def cmd_sweep_fit(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .errors import DataError, check_out_folder
    from .sweep.fit import fit_results, summary_lines

    src = Path(args.results)
    csv_path = src / "results.csv" if src.is_dir() else src
    out = Path(args.out) if args.out else csv_path.parent / "fit"
    check_out_folder(out, "--out", DataError)
    fit = fit_results(csv_path, out, budgets=args.budgets, bootstrap_replicates=args.bootstrap, seed=args.seed,
                      params=args.params, level=args.level)
    print("\n".join(summary_lines(fit)))
    print(f"wrote {out}/fit.json, {out}/report.md, " + ", ".join(str(out / name) for name in fit["plots"].values()))


def _progress(description: str, total: int | None = None):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(description), BarColumn(), TextColumn("{task.completed:,} docs {task.fields[info]}"),
                    TimeElapsedColumn(), transient=False)


def cmd_data_tokenizer(args: argparse.Namespace) -> None:
    from .data import train_tokenizer
    from .data.corpus import check_readable, expand_inputs
    from .data.prep import sample_documents, train_tokenizer_on_ray
    from .data.tokenizer import check_tokenizer_args
    from .errors import DataError

    if not args.ray and (args.tasks or args.address):
        raise DataError("--tasks and --address need --ray")
    check_tokenizer_args(args.out, args.vocab_size, args.model_type)  # before sampling (and Ray) starts
    files = expand_inputs(args.input)
    if args.on_bad_input == "stop":
        check_readable(files)
    if args.ray:
        from pathlib import Path

        from .data.prep import ray_session

        Path(args.out).mkdir(parents=True, exist_ok=True)
        with ray_session(args.address or "local", args.workers):  # one Ray for sampling and training
            texts, stats = sample_documents(files, args.sample_chars, args.seed, args.text_field, args.on_bad_input,
                                            use_ray=True, workers=args.workers, tasks=args.tasks, scratch=args.out)
            path = train_tokenizer_on_ray(texts, args.out, args.vocab_size, args.model_type,
                                          args.input_sentence_size, args.seed)
    else:
        texts, stats = sample_documents(files, args.sample_chars, args.seed, args.text_field, args.on_bad_input)
        path = train_tokenizer(texts, args.out, args.vocab_size, args.model_type, args.input_sentence_size,
                               seed=args.seed)
    print(f"wrote {path} (vocab {args.vocab_size}, {args.model_type}) from a sample of {len(texts):,} of "
          f"{stats.documents:,} documents ({sum(map(len, texts)):,} characters, seed {args.seed}) in {stats.files} "
          f"files; {stats.summary()}")


def cmd_data_shards(args: argparse.Namespace) -> None:
    from .data import CorpusStats, Tokenizer, expand_inputs, read_documents, write_shards
    from .data.corpus import check_readable
    from .errors import DataError

    if not args.ray and (args.tasks or args.address):
        raise DataError("--tasks and --address need --ray")
    tokenizer = Tokenizer(args.tokenizer)
    files = expand_inputs(args.input)
    if args.ray:
        from .data.prep import prepare_shards

        result = prepare_shards(files, tokenizer, args.out, shard_tokens=args.shard_tokens,
                                val_fraction=args.val_fraction, text_field=args.text_field, dedup=args.dedup,
                                on_bad=args.on_bad_input, workers=args.workers, tasks=args.tasks,
                                address=args.address or "local")
        manifest, stats = result.manifest, result.stats
        print(f"tasks: tokenize {result.parts} ({result.parts_kept} kept from an earlier run, "
              f"{result.parts - result.parts_kept} run now), write {result.writes} ({result.writes_kept} kept, "
              f"{result.writes - result.writes_kept} run now); {result.tokens_done:,} tokens tokenized in "
              f"{result.seconds['tokenize']:.1f} s = {result.tokens_per_s:,.0f} tokens/s")
    else:
        if args.on_bad_input == "stop":
            check_readable(files)
        stats = CorpusStats()
        with _progress("writing shards") as progress:
            task = progress.add_task("", total=None, info="")
            manifest = write_shards(read_documents(files, args.text_field, stats, args.on_bad_input), tokenizer,
                                    args.out, stats, shard_tokens=args.shard_tokens, val_fraction=args.val_fraction,
                                    workers=args.workers or 2, dedup=args.dedup,
                                    progress=lambda docs, tokens: progress.update(task, advance=docs,
                                                                                  info=f"{tokens:,} tokens"))
    counts = {s: (len(e), sum(x.tokens for x in e)) for s, e in manifest.splits.items()}
    print(f"wrote {args.out}: " + ", ".join(f"{s} {n} shards / {t:,} tokens" for s, (n, t) in counts.items())
          + f"; {stats.summary()}" + (f"; dropped {stats.duplicates:,} duplicate documents" if args.dedup else ""))


def cmd_data_verify(args: argparse.Namespace) -> int:
    from .data import verify
    from .errors import DataError

    lines, damaged = verify(args.dir)
    if not lines:  # "all 0 shards match" would pass a dataset that holds nothing to train on
        raise DataError(f"{args.dir}: the manifest lists no shards")
    print("\n".join(lines))
    if damaged:
        print(f"{len(damaged)} damaged shard(s): {', '.join(damaged)}", file=sys.stderr)
        return 1
    print(f"all {len(lines)} shards match the manifest")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkv-dist", description="Distributed pretraining for RWKV-4 language models.")
    # the deepspeed launcher puts --local_rank=N before the subcommand (LOCAL_RANK is in the environment as well)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter count, FLOPs/token and weight bytes of a model config (nothing allocated)")
    p.add_argument("config", help="YAML with a `model:` section, e.g. configs/model/rwkv4-169m.yaml")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plan", help="memory, communication and step time of every 3D layout of a run on a GPU cluster")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--gpus", type=_positive(int, "--gpus"), required=True)
    p.add_argument("--gpu", default="H100", help="GPU type: A100-40G, A100-80G, H100, H200")
    p.add_argument("--gpu-mem", type=_positive(float, "--gpu-mem"), help="GB per GPU (default: the type's)")
    p.add_argument("--gpus-per-node", type=_positive(int, "--gpus-per-node"), default=8)
    p.add_argument("--tensor", type=_positive(int, "--tensor"), help="only layouts with this tensor-parallel degree")
    p.add_argument("--pipeline", type=_positive(int, "--pipeline"), help="only layouts with this many pipeline stages")
    p.add_argument("--zero", type=int, choices=(2, 3), default=3, help="ZeRO stage of the data-parallel sharding")
    p.add_argument("--rows", type=_positive(int, "--rows"), default=12, help="layouts shown (fastest first)")
    p.add_argument("--json", action="store_true", help="every layout as JSON instead of the table")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("export", help="write weights as a BlinkDL .pth or a transformers RwkvForCausalLM directory")
    p.add_argument("src", help="a .pth / .safetensors state dict with BlinkDL RWKV-4 names, or a training checkpoint "
                               "(step folder, or run folder for its newest committed step)")
    p.add_argument("--format", required=True, choices=["blinkdl", "hf"])
    p.add_argument("--out", required=True, help="output file (blinkdl) or directory (hf)")
    p.add_argument("--dtype", default="keep", choices=["keep", "fp32", "bf16", "fp16"])
    p.add_argument("--tokenizer", help="hf: tokenizer.model to write as tokenizer.json (default: a training "
                                       "checkpoint's own; a weights file has none)")
    p.set_defaults(func=cmd_export)

    data = sub.add_parser("data", help="tokenizer, shards, verify").add_subparsers(dest="data_command", required=True)
    inputs_help = "text/JSONL files or globs (.gz .bz2 .xz .zst ok); builtin:stdlib = the embedded demo corpus"
    p = data.add_parser("tokenizer", help="train a sentencepiece tokenizer on text/JSONL files")
    p.add_argument("--input", nargs="+", required=True, help=inputs_help)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="directory for tokenizer.model")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--input-sentence-size", type=_positive(int, "--input-sentence-size"), default=2_000_000,
                   help="lines sampled for training")
    p.add_argument("--sample-chars", type=int, default=200_000_000,
                   help="train on a uniform sample of documents over all inputs of about this many characters "
                        "(smaller corpora are used whole)")
    p.add_argument("--seed", type=_positive(int, "--seed", zero=True), default=0,  # sentencepiece takes no negatives
                   help="fixes the sample (and sentencepiece's own sampling)")
    p.add_argument("--on-bad-input", choices=["stop", "skip"], default="stop",
                   help="stop at an unreadable file / bad JSONL line naming it, or skip and count it")
    p.add_argument("--ray", action="store_true", help="read and sample the inputs with Ray tasks, train in one")
    p.add_argument("--address", help="with --ray: local (default), auto, HOST:PORT or ray://HOST:PORT")
    p.add_argument("--workers", type=_positive(int, "--workers"),
                   help="with --ray: tasks running at once (default 2 locally, every CPU of a cluster)")
    p.add_argument("--tasks", type=_positive(int, "--tasks"), help="with --ray: parts the inputs are cut into")
    p.set_defaults(func=cmd_data_tokenizer)

    p = data.add_parser("shards", help="tokenize into WebDataset shards with a manifest")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model or its directory")
    p.add_argument("--input", nargs="+", required=True, help=inputs_help)
    p.add_argument("--out", required=True)
    p.add_argument("--shard-tokens", type=int, default=10_000_000)
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--workers", type=_positive(int, "--workers"), default=None,
                   help="tokenizer threads (default 2); with --ray: tasks running at once (default 2 locally, every "
                        "CPU of a cluster)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--dedup", action="store_true", help="keep one copy of documents with the same normalized text "
                                                        "(the first in input order); counted in the manifest")
    p.add_argument("--on-bad-input", choices=["stop", "skip"], default="stop",
                   help="an unreadable file, a line that is not JSON, a record without text: stop with an error "
                        "naming file and line, or skip and count it in the manifest")
    p.add_argument("--ray", action="store_true", help="tokenize with Ray tasks (same dataset, byte for byte); "
                                                      "resumes after an interruption")
    p.add_argument("--address", help="with --ray: local (default, a private instance), auto, HOST:PORT or "
                                               "ray://HOST:PORT")
    p.add_argument("--tasks", type=_positive(int, "--tasks"),
                   help="with --ray: parts the inputs are cut into (default: 4 per worker, at least one per 256 MiB)")
    p.set_defaults(func=cmd_data_shards)

    p = data.add_parser("verify", help="check every shard against the manifest; exit 1 naming damaged shards")
    p.add_argument("dir", help="dataset directory or URL prefix")
    p.set_defaults(func=cmd_data_verify)

    p = sub.add_parser("train", help="pretrain with DeepSpeed (alone, or under torchrun / the deepspeed launcher)")
    p.add_argument("config", help="run config YAML, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. schedule.steps=100")
    p.add_argument("--resume", default=None,
                   help="auto (newest committed checkpoint), none, or a step folder; default: checkpoint.resume")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("launch", help="train on N Ray Train workers, restarted after failures")
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--workers", type=int, required=True, help="training ranks (Ray Train workers)")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=0)
    p.add_argument("--address", default="local", help="local (a private Ray instance), auto (this node's cluster) or "
                                                      "ray://HOST:PORT")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before the run fails")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("sweep", help="run a grid of sizes x token budgets as Ray tasks; finished runs are skipped")
    p.add_argument("sweep", help="sweep YAML, e.g. configs/sweeps/tiny-cpu.yaml")
    p.add_argument("--address", default="local", help="local (a private Ray instance) or auto / ray://HOST:PORT")
    p.add_argument("--dry-run", action="store_true", help="validate every run and print the commands; start nothing")
    p.add_argument("--status-every", type=float, default=30.0, metavar="SECONDS",
                   help="print the status table this often while runs go on (0: only at the end)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("sweep-status", help="where a sweep stands: run, status, step/total, loss, ETA (from its folder)")
    p.add_argument("out", help="the sweep's out_dir")
    p.set_defaults(func=cmd_sweep_status)

    p = sub.add_parser("sweep-fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta (and isoFLOP "
                                          "parabolas) to a sweep's results; intervals, plots, report")
    p.add_argument("results", help="results.csv or the sweep's out_dir")
    p.add_argument("--out", help="folder for fit.json and the PNGs (default: next to results.csv, fit/)")
    p.add_argument("--budgets", type=_positive(float, "--budgets"), nargs="+",
                   help="FLOP budgets for the compute-optimal N, D (default: the sweep's own budgets, else 1-1000x the "
                        "largest run)")
    p.add_argument("--bootstrap", type=_positive(int, "--bootstrap", zero=True), default=0, metavar="B",
                   help="intervals from B bootstrap replicates (runs resampled; e.g. 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--level", type=_unit_interval("--level"), default=0.9, help="interval coverage (default 0.9)")
    p.add_argument("--params", choices=["total", "non-embedding"], default="total",
                   help="N: every parameter, or without the V x D embedding and head")
    p.set_defaults(func=cmd_sweep_fit)

    ckpt_help = "training checkpoint (step or run folder) or a BlinkDL .pth / .safetensors"
    p = sub.add_parser("generate", help="sample text from a model in recurrent mode")
    p.add_argument("checkpoint", help=ckpt_help)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=_positive(int, "--max-tokens"), default=100)
    p.add_argument("--temperature", type=_positive(float, "--temperature"), default=0.8)
    p.add_argument("--top-p", type=_unit_interval("--top-p"), default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=_positive(int, "--num-samples"), default=1,
                   help="continuations decoded together as one batch; sample i uses seed SEED+i, the text a "
                        "1-sample run with --seed SEED+i prints (default 1)")
    p.add_argument("--weights", choices=["fp32", "bf16", "int8"], default="fp32",  # model.decode.WEIGHT_FORMATS
                   help="how decoding stores the matrices: fp32 (default), or bf16 / int8 (per-row scale) read at "
                        "half / a quarter of the bytes, with fp32 math (CPU)")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the checkpoint's)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="validation loss and perplexity of a model on a dataset's val split")
    p.add_argument("checkpoint", help=ckpt_help)
    p.add_argument("--data", required=True, help="dataset folder (shards + manifest) with a val split")
    p.add_argument("--ctx-len", type=_positive(int, "--ctx-len"), default=None, help="default: the model's")
    p.add_argument("--batch-size", type=_positive(int, "--batch-size"), default=4)
    p.add_argument("--max-batches", type=_positive(int, "--max-batches"), default=None)
    p.add_argument("--segment-len", type=_positive(int, "--segment-len"), default=1024,
                   help="tokens per forward: windows run in segments carrying the state (memory of one segment)")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the checkpoint's)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("lm-eval", help="downstream tasks with lm-evaluation-harness (the rwkv_dist backend)")
    p.add_argument("checkpoint", help=ckpt_help)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks; rwkv-paper = the paper's zero-shot "
                                                  "suite beside the official RWKV-4 figures")
    p.add_argument("--include-path", action="append", help="folder of local task YAMLs (repeatable)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=_positive(float, "--limit"), default=None,
                   help="documents per task (a fraction of them if < 1)")
    p.add_argument("--batch-size", type=_positive(int, "--batch-size"), default=8)
    p.add_argument("--output-path", help="folder for lm-eval's results JSON (and samples)")
    p.add_argument("--log-samples", action="store_true", help="also write every request and response")
    p.add_argument("--tokenizer", help="tokenizer.model or a tokenizers .json (default: the checkpoint's)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser("demo", help="embedded corpus -> tokenizer -> shards -> ZeRO-3 on 2 processes -> sample")
    p.add_argument("--out", default="runs/demo", help="where the tokenizer, shards and outputs go")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="training processes")
    p.set_defaults(func=cmd_demo)
    return parser


def _out_of_memory(e: BaseException) -> str | None:
    """One line for an allocation that failed (a model, context or batch too large for the machine), else None.
    torch reports it as a RuntimeError (CPU: "can't allocate memory"; CUDA: torch.OutOfMemoryError)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not (isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()):
        return None
    text = text.split("] err == 0. ", 1)[-1]  # c10's "[enforce fail at alloc_cpu.cpp:127] err == 0. " prefix
    return (f"out of memory ({text[:200]}); a smaller model, model.ctx_len, schedule.micro_batch_size or --batch-size "
            f"fits (`rwkv-dist plan` estimates the memory of a run)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse ends `overrides` at the first option: `train C --resume auto a.b=1` leaves a.b=1 over
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    command = " ".join(filter(None, [args.command, getattr(args, "data_command", None)]))
    try:
        return args.func(args) or 0
    except (RWKVDistError, MemoryError, RuntimeError) as e:
        message = str(e) if isinstance(e, RWKVDistError) else _out_of_memory(e)
        if message is None:  # any other RuntimeError is a bug: keep its traceback
            raise
        print(f"rwkv-dist {command}: error: {message}", file=sys.stderr)
        if "torch.distributed" in sys.modules:  # a trainer that failed after joining a process group
            from .train.distributed import finish

            finish(2, wait=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
