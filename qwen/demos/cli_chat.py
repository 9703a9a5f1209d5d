"""``qwen chat``: the terminal chat demo (streaming), with the official cli_demo.py commands.

Unlike the original, ``:conf`` changes the settings that generation really uses, values are parsed
as Python literals (never ``eval``), and an interrupted answer is not added to the history.
"""

from __future__ import annotations

import argparse
import ast
import sys
from typing import Any

from ..commands.common import add_generation_args, add_model_args, generation_overrides, load

HELP = """\
Commands:
    :help / :h              show this help
    :exit / :quit / :q      exit
    :clear / :cl            clear the screen
    :clear-his / :clh       clear the history
    :history / :his         show the history
    :seed                   show the current seed
    :seed <N>               set the seed used for every answer
    :conf                   show the generation settings
    :conf <key>=<value>     change settings, e.g. :conf temperature=0.7 top_p=0.9 max_new_tokens=256
    :reset-conf             restore the checkpoint's settings
Anything else is sent to the model. Ctrl-C stops an answer; Ctrl-C or Ctrl-D at the prompt exits."""


def _parse_conf(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def handle_command(session: Any, line: str, defaults: Any, out: Any = sys.stdout) -> bool:
    """Run a ':' command; False when the session should end. Unknown ':xxx' is not a command."""
    parts = line.split()
    cmd, rest = parts[0], parts[1:]
    if cmd in (":help", ":h"):
        print(HELP, file=out)
    elif cmd in (":exit", ":quit", ":q"):
        return False
    elif cmd in (":clear", ":cl"):
        out.write("\033[2J\033[H")
    elif cmd in (":clear-his", ":clh"):
        session.clear()
        print("History cleared.", file=out)
    elif cmd in (":history", ":his"):
        for i, (q, r) in enumerate(session.history):
            print(f"User[{i}]: {q}\nQwen[{i}]: {r}", file=out)
        if not session.history:
            print("(empty)", file=out)
    elif cmd == ":seed":
        if rest:
            try:
                session.set_config(seed=int(rest[0]))
            except ValueError:
                print(f"not an integer seed: {rest[0]!r}", file=out)
        print(f"seed: {session.generation_config.seed}", file=out)
    elif cmd == ":conf":
        if rest:
            try:
                session.set_config(**_parse_conf(rest))
            except (ValueError, TypeError) as e:
                print(f"error: {e}", file=out)
        for key, value in session.generation_config.to_dict().items():
            print(f"  {key} = {value!r}", file=out)
    elif cmd == ":reset-conf":
        session.generation_config = defaults.copy()
        print("Generation settings restored.", file=out)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen chat", description=__doc__)
    add_model_args(parser)
    parser.add_argument("--system", default="You are a helpful assistant.", help="system prompt")
    add_generation_args(parser)
    args = parser.parse_args(argv)

    from ..chat import ChatSession

    model, tokenizer = load(args)
    session = ChatSession(model, tokenizer, system=args.system)
    overrides = generation_overrides(args)
    if "seed" not in overrides:
        overrides["seed"] = 1234  # the official demo's default seed
    session.set_config(**overrides)
    defaults = session.generation_config.copy()
    print(f"Qwen chat with {args.model}. Type :h for help, :q to quit.")
    while True:
        try:
            query = input("\nUser> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not query:
            continue
        if query.startswith(":") and query.split()[0] in COMMANDS:
            if not handle_command(session, query, defaults):
                return 0
            continue
        sys.stdout.write("\nQwen> ")
        try:
            for delta in session.send(query, stream=True):
                sys.stdout.write(delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
        except KeyboardInterrupt:
            print("\n[Generation interrupted]")
    return 0


COMMANDS = {":help", ":h", ":exit", ":quit", ":q", ":clear", ":cl", ":clear-his", ":clh", ":history", ":his",
            ":seed", ":conf", ":reset-conf"}
