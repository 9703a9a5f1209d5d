"""Arguments and loading shared by the commands that run a model."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_model_args(parser: argparse.ArgumentParser, default_model: str | None = "qwen-demo") -> None:
    parser.add_argument("--model", "-c", "--checkpoint-path", dest="model", default=default_model,
                        help="checkpoint directory (default: the embedded demo model 'qwen-demo')")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 or auto (default: cuda when available, else cpu)")
    parser.add_argument("--cpu-only", action="store_true", help="same as --device cpu (official cli_demo flag)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: bf16/fp16 on GPU, fp32 on CPU)")
    parser.add_argument("--kv-cache-int8", nargs="?", const="round", default=None, choices=["round", "official"],
                        help="keep the KV cache in uint8 (use_cache_quantization; 'official' = the official "
                             "quantizer bit for bit, default 'round'; docs/quantization.md)")
    parser.add_argument("--int8-lm-head", action="store_true",
                        help="CPU: round lm_head to int8 for faster decode (a small deviation from the checkpoint; "
                             "docs/quantization.md)")


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("generation (defaults come from the checkpoint's generation_config.json)")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None, help="0 disables top-k")
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--greedy", action="store_true", help="greedy decoding (do_sample=False)")
    g.add_argument("--seed", "-s", type=int, default=None, help="seed for sampling")


def generation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                                         "seed") if getattr(args, k, None) is not None}
    if getattr(args, "greedy", False):
        out["do_sample"] = False
    return out


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) for ``args.model``; exits with a clear message when the path is unusable."""
    import torch

    from ..auto import AutoModelForCausalLM, AutoTokenizer
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..hub import ModelNotFoundError

    device = "cpu" if args.cpu_only else args.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        extra = {}
        if getattr(args, "kv_cache_int8", None):
            extra = {"use_cache_quantization": True, "cache_quantization_mode": args.kv_cache_int8}
        if getattr(args, "int8_lm_head", False):
            extra["int8_lm_head"] = True
        model = AutoModelForCausalLM.from_pretrained(args.model, device_map=device, torch_dtype=args.dtype, **extra)
    except (ModelNotFoundError, CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"qwen: {e}", file=sys.stderr)
        if args.model == "qwen-demo":
            print("usage: qwen chat --model /path/to/Qwen-7B-Chat   (a directory with config.json, *.safetensors, "
                  "qwen.tiktoken)", file=sys.stderr)
        raise SystemExit(1) from None
    return model.eval(), tokenizer
