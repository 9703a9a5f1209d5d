"""``qwen agent``: a ReAct agent in the terminal, with a calculator, a sandboxed code interpreter and your tools.

    qwen agent                                         # the demo model, built-in tools, interactive
    qwen agent --model Qwen-7B-Chat --query "What is 37 * 91 + 5?"
    qwen agent --server http://127.0.0.1:8000/v1 --tools calculator code_interpreter --tools-file my_tools.py
    qwen agent --model Qwen-7B-Chat --transcript run.json --query "Plot sin(x) from 0 to 2 pi"

Thoughts, actions and observations are printed as they happen; the final answer last. The code
interpreter runs the model's Python in a sandboxed process (no network, its own working directory,
time/memory/output limits) whose variables persist across the conversation; figures are saved as PNG
files in that directory and their paths printed. --tools-file loads a Python file and takes every
`qwen.agent.Tool` it defines (e.g. functions decorated with @tool), or the list it names TOOLS.
Commands in the interactive prompt: :clear (forget the conversation), :tools, :quit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from .common import add_generation_args, add_model_args, generation_overrides

BUILTIN = ["calculator", "code_interpreter"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--server", metavar="URL", default=None,
                        help="use an OpenAI-compatible server (qwen serve) instead of loading --model")
    parser.add_argument("--server-model", default="qwen", help="--server: the model name to request")
    parser.add_argument("--api-key", default="EMPTY", help="--server: API key")
    parser.add_argument("--tools", nargs="*", default=BUILTIN, metavar="NAME",
                        help=f"built-in or registered tools (default: {' '.join(BUILTIN)}; none: --tools)")
    parser.add_argument("--tools-file", action="append", default=[], metavar="PY",
                        help="a Python file defining qwen.agent.Tool objects (repeatable)")
    parser.add_argument("--workdir", metavar="DIR", default=None,
                        help="code interpreter: working directory (default: a temporary one, removed at exit)")
    parser.add_argument("--max-steps", type=int, default=8, help="most tool calls per question (default 8)")
    parser.add_argument("--system", default=None, help="system prompt (default: 'You are a helpful assistant.')")
    parser.add_argument("--query", "-q", default=None, help="answer one question and exit")
    parser.add_argument("--transcript", metavar="JSON", default=None,
                        help="write every turn (steps, answer, the exact text exchanged) to this file")
    parser.add_argument("--quiet", action="store_true", help="print only the final answers")
    add_generation_args(parser)
    return parser


def load_tools_file(path: str | Path) -> list[Any]:
    """The Tool objects a user's Python file defines (its TOOLS list if it has one)."""
    from ..agent import Tool

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tools file")
    spec = importlib.util.spec_from_file_location(f"qwen_user_tools_{abs(hash(str(path)))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    declared = getattr(module, "TOOLS", None)
    found = list(declared) if declared is not None else [v for v in vars(module).values() if isinstance(v, Tool)]
    tools = [t if isinstance(t, Tool) else Tool.from_function(t) for t in found]
    if not tools:
        raise ValueError(f"{path}: defines no qwen.agent.Tool (decorate functions with @tool or list them in TOOLS)")
    return tools


def build_tools(names: list[str], files: list[str], workdir: str | None) -> list[Any]:
    from ..agent import get_tool
    from ..agent.builtin import CodeInterpreter

    tools: list[Any] = []
    for name in names:
        tools.append(CodeInterpreter(workdir=workdir) if name == "code_interpreter" else get_tool(name))
    for f in files:
        tools += load_tools_file(f)
    return tools


def _backend(args: argparse.Namespace) -> Any:
    from ..agent import LocalBackend, OpenAIBackend

    overrides = generation_overrides(args)
    if args.server:
        sampling = {k: v for k, v in overrides.items() if k in ("temperature", "top_p", "seed")}
        if "max_new_tokens" in overrides:
            sampling["max_tokens"] = overrides["max_new_tokens"]
        if overrides.get("do_sample") is False:
            sampling["temperature"] = 0.0
        return OpenAIBackend(args.server, model=args.server_model, api_key=args.api_key, **sampling)
    from .common import load

    model, tokenizer = load(args)
    overrides.setdefault("max_new_tokens", 512)
    return LocalBackend(model, tokenizer, **overrides)


class _Printer:
    """Prints agent events: thoughts dimmed, actions and observations marked, the answer plain."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stdout.isatty()
        self.open = ""

    def _style(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.tty else text

    def event(self, ev: Any) -> None:
        if self.quiet:
            if ev.kind == "final":
                print(ev.text, flush=True)
            return
        if ev.kind == "thought":
            if self.open != "thought":
                self._newline()
                sys.stdout.write(self._style("Thought: ", "2"))
                self.open = "thought"
            sys.stdout.write(self._style(ev.text, "2"))
        elif ev.kind == "action":
            self._newline()
            print(self._style(f"Action: {ev.tool}", "36"), self._style(ev.arguments or "", "36"))
        elif ev.kind == "observation":
            self._newline()
            print(self._style("Observation: ", "33") + ev.text)
        elif ev.kind == "final":
            self._newline()
            print(self._style("Answer: ", "1") + ev.text)
            if ev.result is not None and ev.result.stopped == "step_limit":
                print(self._style("(stopped at the step limit)", "31"))
        sys.stdout.flush()

    def _newline(self) -> None:
        if self.open:
            sys.stdout.write("\n")
            self.open = ""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.max_steps < 0:
        print("qwen agent: --max-steps must be >= 0", file=sys.stderr)
        return 2
    from ..agent import Agent

    try:
        tools = build_tools(args.tools, args.tools_file, args.workdir)
    except (OSError, ValueError, KeyError, SyntaxError, ImportError) as e:
        print(f"qwen agent: {e}", file=sys.stderr)
        return 1
    backend = _backend(args)
    kwargs = {"system": args.system} if args.system is not None else {}
    printer = _Printer(args.quiet)
    turns: list[dict[str, Any]] = []
    with Agent(backend, tools, max_steps=args.max_steps, **kwargs) as agent:
        history: list[Any] = []

        def answer(query: str) -> None:
            nonlocal history
            result = None
            for ev in agent.stream(query, history):
                printer.event(ev)
                if ev.kind == "final":
                    result = ev.result
            assert result is not None
            history = result.history
            turns.append({"query": query, "answer": result.answer, "stopped": result.stopped,
                          "steps": [s._asdict() for s in result.steps], "transcript": result.transcript})
            if args.transcript:
                tmp = Path(args.transcript).with_name(Path(args.transcript).name + ".tmp")
                tmp.write_text(json.dumps(turns, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
                tmp.replace(args.transcript)

        if args.query is not None:
            answer(args.query)
            return 0
        names = ", ".join(t.name for t in tools) or "none"
        print(f"qwen agent: tools {names}. :clear forgets the conversation, :tools lists tools, :quit exits.")
        while True:
            try:
                query = input("\nUser: ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not query:
                continue
            if query in (":quit", ":exit", ":q"):
                return 0
            if query == ":clear":
                history = []
                print("(conversation cleared)")
                continue
            if query == ":tools":
                for t in tools:
                    print(f"  {t.name}: {t.description}")
                continue
            try:
                answer(query)
            except KeyboardInterrupt:
                print("\n(interrupted)")
