"""GSM8K (grade-school maths word problems) for base and chat models, scored as the official eval/ scripts.

What the official scripts do, and how it is reproduced here:

- **Base** (``evaluate_gsm8k.py``): the prompt is a fixed 8-shot prefix (the file ``gsm8k_prompt.txt``:
  eight ``"Question: {q}\\nLet's think step by step\\n{worked solution}\\nThe answer is {N}\\n"`` blocks
  separated by blank lines), then ``"\\nQuestion: {question}\\nLet's think step by step\\n"``. Greedy
  ``model.generate`` with the checkpoint's generation config (512 new tokens), the continuation cut
  before the first ``<|endoftext|>``, ``"\\n\\n\\n"``, ``"\\n\\n"`` or ``"Question:"``. The prediction is the
  LAST run of ASCII-or-Unicode digits (``\\d+``) in the continuation, evaluated as a Python literal: so
  no sign, no decimals, a comma splits a number ("1,234" gives 234) and a run with a leading zero such
  as "05" is not a valid literal and counts as no answer. The gold is the text after ``"#### "``
  in the dataset's answer (sign, digits, points and commas; commas removed), also evaluated; correct
  iff prediction == gold as Python numbers (so 18 == 18.0).
  We cannot ship the official prompt file; pass it (or any file in its format) as ``prompt_file``, or
  let the prefix be built from the first ``shots`` items of the GSM8K train jsonl in the same format
  (calculator annotations ``<<...>>`` removed, ``#### N`` written as ``The answer is N``). The
  official file holds eight hand-picked train problems, not the first eight, so scores from a
  train-built prefix differ slightly from the published ones.
- **Chat** (``evaluate_chat_gsm8k.py``): 0-shot, the query is the bare question (no instruction),
  one ``model.chat`` turn with the default system prompt, greedy, repetition penalty 1. Its optional
  few-shot mode (``--use-fewshot``, four examples written into the script) puts the examples before
  ``"Question: {q}\\nLet's think step by step"`` (no trailing newline); here ``shots > 0`` with a chat
  model does the same with examples from ``prompt_file`` or the train file. The prediction is the last
  number in the reply as the script's pattern finds it: optional sign, thousands groups "1,234,567"
  (commas removed; "12,34" is two numbers), decimals, a bare trailing point "18." and ".5";
  the gold is the last such number of the dataset's whole answer text; correct iff both evaluate as
  Python literals and differ by at most 1e-4.

Data: the official jsonl (``{"question": ..., "answer": "...\\n#### 72"}``, as in openai/grade_school_math
``grade_school_math/data/``): ``data`` is the test file, or a directory holding ``test.jsonl``. Without a
prompt file the train file defaults to ``train.jsonl`` beside the test file.

Resumable: every scored item is appended to ``{output}/items/gsm8k{-chat}/{k}-shot/test.jsonl`` once its
batch is generated; a rerun with the same output and settings generates only what is missing (records
of other settings, e.g. another prompt or max_new_tokens, are ignored). Where we differ from the
official scripts: docs/evaluation.md.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..checkpoint import progress_bar
from . import generation
from .multiple_choice import EvalDataError

INVALID = "[invalid]"  # the base script's marker for "no number found"
BASE_STOPS = ("<|endoftext|>", "\n\n\n", "\n\n", "Question:")
MAX_NEW_TOKENS = 512  # generation_config.json of the released base and chat models
THINK = "Let's think step by step"

# "#### " then what the base script accepts as the gold number: an optional minus, digits, points, commas.
_GOLD = re.compile(r"#### (-?[0-9.,]+)")
_DIGITS = re.compile(r"\d+")
# The chat script's notion of "a number" (its last match in the reply is the prediction). Written out:
_CHAT_NUMBER = re.compile(
    r"""
    [+-]?                                   # a sign ('+' is dropped afterwards, '-' kept)
    (?=[0-9]|\.[0-9])                       # an ASCII digit starts here, maybe after a point
    (?: 0                                   # integer part: a lone zero,
      | [1-9]\d{0,2}(?:,\d{3})*             #   or thousands groups 1,234,567 (plain 1234 fails this...
      | \d* )?                              #   ... and ends here, as does the empty part of ".5")
    (?:\.\d*)?                              # a point and maybe decimals ("18." at a sentence end too)
    (?!\d)                                  # never stop in the middle of digits
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the dataset's worked solution ending in "#### N"


# -------------------------------------------------------------------------------------------- numbers
def _literal(text: str) -> Any:
    """``text`` as the official scripts' ``eval`` reads it, without running code (the inputs here are only
    signs, digits and points, for which ``ast.literal_eval`` and ``eval`` agree, errors included)."""
    return ast.literal_eval(text)


def gold_number(answer: str) -> int | float:
    """The base script's gold: the number after ``"#### "``, commas removed. ValueError when there is none."""
    m = _GOLD.search(answer)
    if not m:
        raise ValueError('no "#### N" final answer')
    text = m.group(1).strip().replace(",", "")
    try:
        value = _literal(text)
    except Exception as e:  # "1.2.3", "05", ...: the official script would crash here
        raise ValueError(f"the final answer {m.group(1)!r} is not a number ({e})") from None
    if not isinstance(value, (int, float)):
        raise ValueError(f"the final answer {m.group(1)!r} is not a number")
    return value


def extract_base(completion: str) -> int | str:
    """The base script's prediction: the last digit run as a Python int, or ``INVALID``."""
    runs = _DIGITS.findall(completion)
    if not runs:
        return INVALID
    try:
        value = _literal(runs[-1])
    except Exception:  # "05" (leading zero), non-ASCII digits, more than 4300 digits
        return INVALID
    return value if isinstance(value, int) else INVALID


def base_correct(completion: str, gold: int | float) -> bool:
    pred = extract_base(completion)
    return pred != INVALID and pred == gold


def extract_chat(text: str) -> str | None:
    """The chat script's prediction: the last number in ``text`` as a string ("-3", "1234", "18.", ".5"),
    commas and a plus sign removed; None when there is no number."""
    last = None
    for last in _CHAT_NUMBER.finditer(text):
        pass
    if last is None:
        return None
    return last.group().replace(",", "").replace("+", "").strip()


def numbers_equal(gold: str | None, pred: str | None) -> bool:
    """The chat script's comparison: both strings evaluate and lie within 1e-4 of each other."""
    if gold is None or pred is None:
        return False
    try:
        return math.isclose(_literal(gold), _literal(pred), rel_tol=0, abs_tol=1e-4)
    except Exception:  # "05", "-05", overflow: the script prints "cannot compare" and counts it wrong
        return False


def chat_correct(reply: str, answer: str) -> bool:
    return numbers_equal(extract_chat(answer), extract_chat(reply))


# ----------------------------------------------------------------------------------------------- data
def read_jsonl(path: str | os.PathLike, *, gold: str = "base") -> list[Problem]:
    """GSM8K items of a jsonl file; errors name the file and line. ``gold``: "base" checks that every answer
    has the base script's ``#### N``, "chat" that it has a number for the chat script, "" neither."""
    p = Path(path)
    if not p.is_file():
        raise EvalDataError(f"{p}: no such file")
    items = []
    with open(p, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{p}: line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise EvalDataError(f"{p}: line {lineno}: expected an object with \"question\" and \"answer\"")
            missing = [k for k in ("question", "answer") if not isinstance(obj.get(k), str)]
            if missing:
                raise EvalDataError(f"{p}: line {lineno}: missing or non-string {' and '.join(map(repr, missing))}")
            answer = obj["answer"]
            if "####" not in answer:
                raise EvalDataError(f"{p}: line {lineno}: the answer has no \"#### N\" final answer")
            if gold == "base":
                try:
                    gold_number(answer)
                except ValueError as e:
                    raise EvalDataError(f"{p}: line {lineno}: {e}") from None
            elif gold == "chat" and extract_chat(answer) is None:
                raise EvalDataError(f"{p}: line {lineno}: the answer contains no number")
            items.append(Problem(obj["question"], answer))
    return items


def find_test_file(data: str | os.PathLike) -> Path:
    """The test jsonl: ``data`` itself, or ``data/test.jsonl`` for a directory."""
    p = Path(data)
    if p.is_dir():
        if (p / "test.jsonl").is_file():
            return p / "test.jsonl"
        raise EvalDataError(f"{p}: a directory without test.jsonl (give the GSM8K test jsonl, e.g. "
                            "grade_school_math/data/test.jsonl)")
    if not p.is_file():
        raise EvalDataError(f"{p}: no such file (the GSM8K test jsonl)")
    return p


# ---------------------------------------------------------------------------------------------- prompts
_ANNOTATION = re.compile(r"<<[^>]*>>")


def format_shot(problem: Problem) -> str:
    """One few-shot example in the layout of the official prompt file."""
    solution, _, final = problem.answer.rpartition("####")
    steps = _ANNOTATION.sub("", solution).strip("\n")
    return f"Question: {problem.question}\n{THINK}\n{steps}\nThe answer is {final.strip()}\n"


def shots_prefix(train: Sequence[Problem], shots: int) -> str:
    """The first ``shots`` train problems as a few-shot prefix, blank-line separated like the prompt file."""
    if shots > len(train):
        raise EvalDataError(f"{shots} shots asked, the train file has {len(train)} items")
    return "\n".join(format_shot(p) for p in train[:shots])


def count_shots(prefix: str) -> int:
    return sum(1 for line in prefix.split("\n") if line.startswith("Question: "))


def base_prompt(prefix: str, question: str) -> str:
    if not prefix:
        return f"Question: {question}\n{THINK}\n"
    return f"{prefix}\nQuestion: {question}\n{THINK}\n"


def chat_query(prefix: str, question: str) -> str:
    if not prefix:
        return question  # the 0-shot chat script sends the bare question
    return f"{prefix}\nQuestion: {question}\n{THINK}"


def _resolve_prefix(test: Path, chat: bool, shots: int | None, prompt_file: str | os.PathLike | None,
                    train_file: str | os.PathLike | None) -> tuple[str, int, str]:
    """(few-shot prefix, number of shots, where it came from)."""
    if prompt_file is not None:
        pf = Path(prompt_file)
        if not pf.is_file():
            raise EvalDataError(f"{pf}: no such file (the few-shot prompt)")
        prefix = pf.read_text(encoding="utf-8")
        k = count_shots(prefix)
        if shots is not None and shots != k:
            raise EvalDataError(f"{pf}: holds {k} examples, but {shots} shots were asked")
        return prefix, k, f"prompt file {pf}"
    k = (0 if chat else 8) if shots is None else shots
    if k < 0:
        raise EvalDataError(f"shots must be >= 0, got {k}")
    if k == 0:
        return "", 0, "none (0-shot)"
    tf = Path(train_file) if train_file is not None else test.parent / "train.jsonl"
    if not tf.is_file():
        raise EvalDataError(f"{tf}: no such file; a {k}-shot GSM8K run needs a few-shot prompt: pass a prompt file "
                            "in the format of the official eval/gsm8k_prompt.txt, or the GSM8K train jsonl to take "
                            "the first examples from")
    return (shots_prefix(read_jsonl(tf, gold=""), k), k,
            f"first {k} items of {tf} (the official prompt file holds other examples: scores differ slightly)")


# ------------------------------------------------------------------------------------------------- run
def _read_cache(path: Path, key: str) -> dict[int, dict[str, Any]]:
    done: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # cut by an interrupted write: generated again
                continue
            if isinstance(rec, dict) and rec.get("key") == key and "index" in rec:
                done[int(rec["index"])] = rec
    return done


def score(generation_text: str, problem: Problem, chat: bool) -> dict[str, Any]:
    """The record of one item: its generation, the extracted prediction, the gold and correctness."""
    if chat:
        pred = extract_chat(generation_text)
        gold: Any = extract_chat(problem.answer)
        return {"generation": generation_text, "extracted": pred, "gold": gold, "correct": numbers_equal(gold, pred)}
    pred = extract_base(generation_text)
    gold = gold_number(problem.answer)
    return {"generation": generation_text, "extracted": pred, "gold": gold,
            "correct": pred != INVALID and pred == gold}


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | task | shots | items | accuracy |", "|---|---|---|---|---|"]
    for r in results:
        name = r["task"] + ("-chat" if r.get("chat") else "")
        lines.append(f"| {r.get('model', '')} | {name} | {r['shots']} | {r['items']} | {r['average']:.2f} |")
    return "\n".join(lines) + "\n"


def run(model: Any, tokenizer: Any, data: str | os.PathLike, output: str | os.PathLike, *, chat: bool = False,
        shots: int | None = None, prompt_file: str | os.PathLike | None = None,
        train_file: str | os.PathLike | None = None, limit: int | None = None, batch_size: int = 8,
        progress: bool = True, model_label: str = "model", max_new_tokens: int | None = None) -> dict[str, Any]:
    """Score GSM8K's test file ``data``; writes items/, results-gsm8k{-chat}.json and .md to ``output``.

    ``shots`` defaults to 8 for base models and 0 with ``chat`` (the official scripts); a ``prompt_file``
    sets it to the number of its examples.
    """
    test = find_test_file(data)
    problems = read_jsonl(test, gold="chat" if chat else "base")[:limit]
    prefix, k, prompt_source = _resolve_prefix(test, chat, shots, prompt_file, train_file)
    new_tokens = MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    build = chat_query if chat else base_prompt
    prompts = [build(prefix, p.question) for p in problems]
    name = "gsm8k-chat" if chat else "gsm8k"
    key = hashlib.sha1(json.dumps([name, prefix, new_tokens]).encode()).hexdigest()[:16]
    out = Path(output)
    cache_file = out / "items" / name / f"{k}-shot" / "test.jsonl"
    done = _read_cache(cache_file, key)
    cached = sum(1 for i in range(len(problems)) if i in done)
    # Longest prompts first, so that a batch's rows need little padding.
    todo = sorted((i for i in range(len(problems)) if i not in done), key=lambda i: -len(prompts[i]))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(len(problems), name, progress, unit="item")
    bar.update(cached)
    start = time.perf_counter()
    for b in range(0, len(todo), batch_size):
        batch = todo[b : b + batch_size]
        texts = [prompts[i] for i in batch]
        if chat:
            replies = generation.chat_complete(model, tokenizer, texts, max_new_tokens=new_tokens,
                                               batch_size=len(batch), repetition_penalty=1.0)
        else:
            replies = generation.complete(model, tokenizer, texts, max_new_tokens=new_tokens,
                                          stop_strings=BASE_STOPS, batch_size=len(batch))
        lines = []
        for i, reply in zip(batch, replies):
            rec = {"index": i, "key": key, **score(reply, problems[i], chat)}
            done[i] = rec
            lines.append(json.dumps(rec, ensure_ascii=False))
        with open(cache_file, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        bar.update(len(batch))
    bar.close()
    records = [done[i] for i in range(len(problems))]
    correct = sum(bool(r["correct"]) for r in records)
    invalid = sum(r["extracted"] in (None, INVALID) for r in records)
    result = {"task": "gsm8k", "model": model_label, "chat": chat, "shots": k, "items": len(records),
              "correct": correct, "invalid": invalid,
              "average": 100.0 * correct / len(records) if records else math.nan,
              "seconds": round(time.perf_counter() - start, 2), "cached": cached, "prompt": prompt_source,
              "max_new_tokens": new_tokens, "limit": limit, "data": str(test)}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".results-{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / f"results-{name}.json")
    (out / f"results-{name}.md").write_text(markdown_table([result]), encoding="utf-8")
    return result


__all__ = ["INVALID", "BASE_STOPS", "MAX_NEW_TOKENS", "Problem", "gold_number", "extract_base", "base_correct",
           "extract_chat", "numbers_equal", "chat_correct", "read_jsonl", "find_test_file", "format_shot",
           "shots_prefix", "count_shots", "base_prompt", "chat_query", "score", "markdown_table", "run"]
