"""The ``qwen`` command: a table of subcommands, each imported only when it runs.

Every subcommand module exposes ``main(argv: list[str] | None) -> int`` and builds its own argparse
parser, so ``qwen <cmd> --help`` works without loading torch or a model.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("qwen.demos.cli_chat", "interactive streaming chat in the terminal"),
    "generate": ("qwen.commands.generate", "one-shot generation from a prompt (raw or chat)"),
    "info": ("qwen.commands.info", "describe a checkpoint: config, parameters, dtype, size on disk"),
    "init": ("qwen.commands.init", "write a random-weight checkpoint in the official layout"),
    "train": ("qwen.commands.train", "fine-tune (full or LoRA) or pretrain; --recipe demo builds the demo model"),
    "merge": ("qwen.commands.merge", "merge a LoRA adapter into its base model and save in the official layout"),
    "quantize": ("qwen.commands.quantize", "GPTQ or round-to-nearest int4/int8 quantization in the official AutoGPTQ layout"),
    "export": ("qwen.commands.export", "write a checkpoint as a GGUF file for llama.cpp (f32/f16/bf16/q8_0/q4_0/q4_k_m)"),
    "serve": ("qwen.commands.serve", "OpenAI-compatible API server with continuous batching"),
    "web": ("qwen.commands.web", "Gradio chat page in the browser (127.0.0.1, no analytics, never shared)"),
    "eval": ("qwen.commands.eval", "MMLU, C-Eval, CMMLU, GSM8K, HumanEval, tool use, perplexity, as the official eval scripts score them"),
    "agent": ("qwen.commands.agent", "ReAct agent with a calculator, a sandboxed code interpreter and your own tools"),
    "bench": ("qwen.bench.core", "decode/prefill speed and memory, side by side with transformers"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: qwen <command> [options]", "", "Run first-generation Qwen models.", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`qwen <command> --help` describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qwen: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
