"""``qwen init``: write a random-weight checkpoint in the official layout, for testing pipelines without weights."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    from ..config import PRESETS

    parser = argparse.ArgumentParser(prog="qwen init", description=__doc__)
    parser.add_argument("output", help="directory to write (created if missing)")
    parser.add_argument("--preset", required=True, help=f"architecture: one of {', '.join(sorted(PRESETS))} "
                        "(a '-shaped' suffix is accepted, e.g. qwen-1.8b-shaped)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="storage dtype (default bfloat16, like the official checkpoints)")
    parser.add_argument("--base", action="store_true", help="write a base-model generation_config (chat_format raw)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config fields, e.g. --set num_hidden_layers=4 seq_length=2048")
    args = parser.parse_args(argv)

    import json

    import torch

    from ..checkpoint import init_checkpoint

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if not _:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    config = init_checkpoint(args.preset, args.output, seed=args.seed, dtype=getattr(torch, args.dtype),
                             chat=not args.base, **overrides)
    print(f"wrote {args.preset} ({config.num_parameters():,} parameters, {args.dtype}) to {args.output}")
    return 0
