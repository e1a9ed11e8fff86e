"""`rwkv-dist`: the command line. Each subcommand validates its arguments before doing any work."""

from __future__ import annotations

import argparse
import json
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
    import torch

    from .export import export_file

    dtype = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    out = export_file(args.src, args.format, args.out, dtype=dtype)
    print(f"wrote {args.format} export to {out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(steps=args.steps, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkv-dist", description="Distributed pretraining for RWKV-4 language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter count, FLOPs/token and weight bytes of a model config (nothing allocated)")
    p.add_argument("config", help="YAML with a `model:` section, e.g. configs/model/rwkv4-169m.yaml")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("export", help="write weights as a BlinkDL .pth or a transformers RwkvForCausalLM directory")
    p.add_argument("src", help="a .pth / .safetensors state dict with BlinkDL RWKV-4 names")
    p.add_argument("--format", required=True, choices=["blinkdl", "hf"])
    p.add_argument("--out", required=True, help="output file (blinkdl) or directory (hf)")
    p.add_argument("--dtype", default="keep", choices=["keep", "fp32", "bf16", "fp16"])
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="train a tiny RWKV on built-in text for a few seconds and print a sample")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except RWKVDistError as e:
        print(f"rwkv-dist {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
