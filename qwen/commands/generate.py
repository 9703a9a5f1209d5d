"""``qwen generate``: one-shot generation from a prompt, streamed to stdout.

Raw completion by default (what base models do); ``--chat`` wraps the prompt in a ChatML turn.
"""

from __future__ import annotations

import argparse
import sys

from .common import add_generation_args, add_model_args, generation_overrides, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen generate", description=__doc__)
    parser.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    add_model_args(parser)
    parser.add_argument("--chat", action="store_true", help="treat the prompt as a user turn of a chat model")
    parser.add_argument("--system", default="You are a helpful assistant.", help="system prompt with --chat")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    add_generation_args(parser)
    args = parser.parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt

    from ..chat import ChatSession
    from ..generate import stream_generate

    model, tokenizer = load(args)
    overrides = generation_overrides(args)
    last = None
    if args.chat:
        session = ChatSession(model, tokenizer, system=args.system)
        records = session.stream(prompt, stop_strings=args.stop or None, **overrides)
    else:
        records = stream_generate(model, tokenizer, prompt, stop_strings=args.stop or None, **overrides)
    for record in records:
        sys.stdout.write(record.text)
        sys.stdout.flush()
        last = record
    sys.stdout.write("\n")
    if args.stats and last is not None:
        print(f"[{last.prompt_tokens} prompt tokens, {last.generation_tokens} generated, finish {last.finish_reason}; "
              f"prefill {last.prompt_tps:.1f} tok/s, decode {last.generation_tps:.1f} tok/s]", file=sys.stderr)
    return 0
