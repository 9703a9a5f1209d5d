"""``qwen eval``: benchmarks of the model cards, scored as the official eval/ scripts score them.

    qwen eval --model Qwen-7B --task mmlu --data data/mmlu/data --output runs/qwen-7b
    qwen eval --model Qwen-7B-Int4 --task ceval --data data/ceval --output runs/qwen-7b-int4 --batch-size 16

Tasks so far: mmlu (5-shot, test split), ceval (5-shot, val split), cmmlu (5-shot, test split), base
models: the choice letter with the highest next-token probability (docs/evaluation.md); ppl:
perplexity of a text (--data FILE) by context length (--lengths), plain / dynamic NTK / NTK + LogN:

    qwen eval --model Qwen-7B --task ppl --data arxiv.txt --lengths 1024 2048 4096 8192 16384 --output runs/long
 Data is
read from the directory you give, in the benchmarks' own layouts (MMLU's data.tar, C-Eval's
ceval-exam.zip, CMMLU's release, unpacked); nothing is downloaded. Every scored item is cached under
OUTPUT/items/, so an interrupted run resumes where it stopped; OUTPUT/results-TASK.json and .md
hold the accuracies (overall, per category, per subject). --compare merges several runs' results
into one markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", metavar="DIR", help="checkpoint directory (or 'qwen-demo')")
    parser.add_argument("--task", choices=["mmlu", "ceval", "cmmlu", "ppl"], help="benchmark")
    parser.add_argument("--data", metavar="DIR", help="the benchmark's data directory (dev/ and test/ or val/ CSVs)")
    parser.add_argument("--output", "-o", metavar="DIR", help="results and the per-item cache")
    parser.add_argument("--shots", type=int, default=5, help="few-shot examples from dev (default 5; -1 = all)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items of each subject")
    parser.add_argument("--subjects", nargs="+", default=None, help="only these subjects (default: all)")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="prompts keep their last N tokens (default 2048)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                        help="ppl: context lengths (default 1024 2048 4096 8192 16384)")
    parser.add_argument("--windows", type=int, default=4, help="ppl: windows of each length to average (default 4)")
    parser.add_argument("--settings", nargs="+", default=["plain", "ntk", "ntk+logn"],
                        choices=["plain", "ntk", "ntk+logn"], help="ppl: long-context settings (default: all)")
    parser.add_argument("--compare", nargs="+", metavar="RESULTS_JSON", default=None,
                        help="print one markdown table of these results files and exit")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="score whole prompts in left-padded batches instead of reusing the few-shot prefix's "
                        "KV cache per subject (same numbers, slower)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from ..eval.multiple_choice import EvalDataError, markdown_table, run

    if args.compare:
        try:
            results = [json.loads(open(p, encoding="utf-8").read()) for p in args.compare]
        except (OSError, json.JSONDecodeError) as e:
            print(f"qwen eval: {e}", file=sys.stderr)
            return 1
        print(markdown_table(results), end="")
        return 0
    missing = [f"--{k}" for k in ("model", "task", "data", "output") if getattr(args, k) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")

    from ..auto import AutoModelForCausalLM, AutoTokenizer
    from ..checkpoint import CheckpointError
    from ..hub import ModelNotFoundError

    if args.task == "ppl":
        return _perplexity(args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, progress=not args.no_progress).eval()
        result = run(model, tokenizer, args.task, args.data, args.output, shots=args.shots, batch_size=args.batch_size,
                     limit=args.limit, subjects=args.subjects, progress=not args.no_progress, model_label=args.model,
                     max_seq_len=args.max_seq_len, prefix_cache=not args.no_prefix_cache)
    except (EvalDataError, CheckpointError, ModelNotFoundError, OSError) as e:
        print(f"qwen eval: {e}", file=sys.stderr)
        return 1
    print(markdown_table([result]), end="")
    print(f"{result['items']} items in {result['seconds']:.1f} s; wrote {args.output}/results-{args.task}.json",
          file=sys.stderr)
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
