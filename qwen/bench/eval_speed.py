"""Items per second of ``qwen eval``'s multiple-choice scoring: batch 1, batch 8, and the shared-prefix KV cache.

    python -m qwen.bench.eval_speed --model qwen-demo --items 64

A synthetic MMLU-layout set (two subjects of arithmetic questions, 5-shot prompts of ~350 tokens, the
length of real MMLU prompts) is written to a temporary directory; each variant is warmed up on 4
items, then times the whole set. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

SUBJECTS = ("abstract_algebra", "anatomy")
VARIANTS = (("batch 1", 1, False), ("batch 8", 8, False), ("prefix cache", 8, True))


def write_synthetic_mmlu(root: Path, items: int, seed: int = 0) -> None:
    rnd = random.Random(seed)

    def rows(k: int) -> list[list[str]]:
        out = []
        for _ in range(k):
            a, b = rnd.randint(1, 99), rnd.randint(1, 99)
            options = [a + b, a + b + 1, a + b - 1, a * b]
            rnd.shuffle(options)
            question = f"What is {a} plus {b}? Give the exact sum of the two numbers as written in the question."
            out.append([question, *map(str, options), "ABCD"[options.index(a + b)]])
        return out

    for subject in SUBJECTS:
        for split, k in (("dev", 5), ("test", items)):
            path = root / split / f"{subject}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(rows(k))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen.bench.eval_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen-demo", help="checkpoint directory (default: the demo model)")
    parser.add_argument("--items", type=int, default=64, help="test items per subject (default 64)")
    args = parser.parse_args(argv)

    from .. import AutoModelForCausalLM, AutoTokenizer
    from ..eval import multiple_choice as mc

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, progress=False).eval()
    work = Path(tempfile.mkdtemp(prefix="qwen-eval-speed-"))
    try:
        data = work / "mmlu"
        write_synthetic_mmlu(data, args.items)
        rates: dict[str, float] = {}
        for label, batch_size, prefix_cache in VARIANTS:
            out = work / label.replace(" ", "-")
            mc.run(model, tokenizer, "mmlu", data, out, batch_size=batch_size, progress=False, subjects=SUBJECTS[:1],
                   limit=4, prefix_cache=prefix_cache)  # warm-up
            shutil.rmtree(out)
            start = time.perf_counter()
            result = mc.run(model, tokenizer, "mmlu", data, out, batch_size=batch_size, progress=False,
                            subjects=SUBJECTS, prefix_cache=prefix_cache)
            seconds = time.perf_counter() - start
            rates[label] = result["items"] / seconds
            print(f"{label}: {result['items']} items in {seconds:.2f} s = {rates[label]:.2f} items/s "
                  f"({rates[label] / rates['batch 1']:.2f}x batch 1), accuracy {result['average']:.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
