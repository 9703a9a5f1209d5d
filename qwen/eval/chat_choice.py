"""MMLU, C-Eval and CMMLU for chat models: a generated reply, then the letter read out of it.

This follows the official ``eval/evaluate_chat_mmlu.py`` and ``eval/evaluate_chat_ceval.py``. Those
scripts are 0-shot: each test item becomes one ``model.chat`` turn (no history, the default system
prompt "You are a helpful assistant.", the checkpoint's generation_config with ``do_sample=False`` and
``repetition_penalty=1.0``, so greedy and up to its ``max_new_tokens``, 512 for the released chat
models), and the reply is mapped to a letter:

- Query. MMLU: an English instruction (``CHAT_INSTRUCTION_MMLU``), a blank line, the question, then
  ``"A. {a}\\n"`` ... ``"D. {d}\\n"``. C-Eval: the question, a blank line, the same option lines; no
  instruction at all.
- Before searching, the reply is rewritten. MMLU: every option's text (without trailing full stops)
  becomes its letter, case-insensitively, longest option first. C-Eval: the text before the question's
  first blank ``_`` (if longer than 4 characters) becomes ``答案是``, the text after its last blank is
  dropped, both taken from the question's last sentence; then every option's text (without trailing
  ``。``) becomes its letter, longest first.
- Then four patterns are tried in order, the first that matches gives the letter: an answer cue
  ("the answer is X", "choose X"; ``答案是X``, ``选X``), unless negated; "X is correct"
  (``X正确``/``X符合``), unless negated; the reply starting with the letter; the first A-D that is not
  part of a word. When none matches, the option whose text is closest to the reply (thefuzz
  ``process.extractOne``, WRatio) is taken, so every reply yields a letter.

There is no official chat script for CMMLU. Here CMMLU chat is built the C-Eval way (Chinese
benchmark, Chinese prompt layout and Chinese extraction): an extension of ours, documented in
docs/evaluation.md.

Splits and aggregation are those of the base run (``multiple_choice``): MMLU test (micro), C-Eval val
(macro, Hard set), CMMLU test (macro). Every generated item (reply, letter, which rule found it) is
appended to ``{output}/items/{task}-chat/0-shot/{subject}.jsonl`` after each batch; a rerun with the
same output directory generates only what is missing. Replies come from
``qwen.eval.generation.chat_complete`` in left-padded batches, which decode as ``model.chat`` would one
at a time. Where we differ from the official scripts: docs/evaluation.md.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..chat_template import DEFAULT_SYSTEM
from ..checkpoint import progress_bar
from . import generation
from .multiple_choice import (CHOICES, SPECS, TASKS, EvalDataError, Item, _read_cache, aggregate, markdown_table,
                              read_items)

CHAT_INSTRUCTION_MMLU = ("The following is a multiple-choice question. Please choose the most suitable one among "
                         "A, B, C and D as the answer to this question.\n\n")
DEFAULT_MAX_NEW_TOKENS = 512  # the released chat models' generation_config.json
# The official scripts override these two fields of the checkpoint's generation_config.
GREEDY = {"do_sample": False, "repetition_penalty": 1.0}

# Rule names recorded with each extraction (in cascade order).
RULES = ("answer-cue", "is-correct", "leading-letter", "first-letter", "fuzzy")


# ------------------------------------------------------------------------------------------ queries
def chat_query(task: str, item: Item) -> str:
    """The user turn the official chat script sends for ``item`` (CMMLU: the C-Eval layout)."""
    if task not in SPECS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    options = "".join(f"{letter}. {text}\n" for letter, text in zip(CHOICES, item.options))
    if task == "mmlu":
        return CHAT_INSTRUCTION_MMLU + item.question + "\n" + options
    return item.question + "\n\n" + options


# ---------------------------------------------------------------------------------------- patterns
# The patterns are the official ones, written out piece by piece. "[^ABCD]{0,n}?" is a short stretch
# without a letter; the negative look-aheads refuse a cue that is negated before the letter comes.
_LETTER = r"(A|B|C|D)"
_STANDALONE = re.compile(r"(?<![a-zA-Z])" + _LETTER + r"(?![a-zA-Z=])")  # not inside a word, not "A="

# English: "answer is B", "answer: B", "choice B", "choose B"; not "the answer is not B".
_EN_CUE = (r"(?:(?:[Cc]hoose)|(?:(?:[Aa]nswer|[Cc]hoice)(?![^ABCD]{0,20}?(?:n't|not))"
           r"[^ABCD]{0,10}?\b(?:|is|:|be))\b)")
_EN_PATTERNS = (
    re.compile(_EN_CUE + r"[^ABCD]{0,20}?\b" + _LETTER + r"\b"),
    # "B is correct", "B is the right one"; not "B is not correct"
    re.compile(r"\b" + _LETTER + r"\b(?![^ABCD]{0,8}?(?:n't|not)[^ABCD]{0,5}?(?:correct|right))"
               r"[^ABCD]{0,10}?\b(?:correct|right)\b"),
    # the reply is the letter, or starts with "B." / "B," / "B:"
    re.compile(r"^" + _LETTER + r"(?:\.|,|:|$)"),
    _STANDALONE,
)

# Chinese: "选B", "选择：B", "答案是B", "选项为B", "答案：B"; not "答案不是B". The letter must be followed
# by closing punctuation, another letter, "选项" or the end.
_ZH_VERB = r"(?:是|选|为|：|:|】)"
_ZH_CUE = (r"(?:(?:选|选择|选定)[：:]?\s*|(?:(?:答案|选项)(?![^ABCD]{0,10}?(?:不|非)[^ABCD]{0,10}?" + _ZH_VERB + r")"
           r"[^ABCD]{0,10}?" + _ZH_VERB + r")[^ABCD]{0,10}?)")
_ZH_AFTER = r"(?:选项)?(?:\)|。|\.|，|,|．|、|A|B|C|D|$|：|:|\)|）)"
_ZH_RIGHT = r"(?:正确|对[的，。：]|符合)"
_ZH_PATTERNS = (
    re.compile(_ZH_CUE + _LETTER + _ZH_AFTER),
    # "B正确", "B选项符合题意", "B项是对的"; not "B不正确"
    re.compile(_LETTER + r"(?:选?项)?(?![^ABCD]{0,4}?(?:不|非)[^ABCD]{0,4}?" + _ZH_RIGHT + r")[^ABCD]{0,4}?" + _ZH_RIGHT),
    # the reply starts with the letter, optionally in an opening bracket
    re.compile(r"^[\(（]?" + _LETTER + r"(?:。|\)|）|\.|，|,|．|：|:|$)"),
    _STANDALONE,
)


# --------------------------------------------------------------------------------------- extraction
@dataclass(frozen=True)
class Extraction:
    letter: str  # "A".."D"
    rule: str  # one of RULES
    text: str  # the reply after the rewriting the patterns were searched in


def rewrite_reply_mmlu(reply: str, options: Sequence[str]) -> str:
    """The reply with each option's text replaced by its letter (case-insensitive, longest option first)."""
    for letter, text in sorted(zip(CHOICES, options), key=lambda lt: len(lt[1]), reverse=True):
        needle = text.rstrip(".")
        if needle:  # an empty needle would put the letter between every two characters
            reply = re.sub(re.escape(needle), letter, reply, flags=re.IGNORECASE)
    return reply


def rewrite_reply_ceval(reply: str, question: str, options: Sequence[str]) -> str:
    """The reply with the question's stem around its blank removed and each option's text replaced by its letter.

    A model often restates the question's last sentence with the option filled in ("关于……的特性是既保证
    可靠，也保证按序交付"): the part before the blank becomes 答案是, the part after it goes.
    """
    pieces = question.rstrip("。").split("。")[-1].split("_")
    if len(pieces[0].strip()) > 4:
        reply = reply.replace(pieces[0], "答案是")
    if len(pieces[-1].strip()) > 4:
        reply = reply.replace(pieces[-1], "")
    for letter, text in sorted(zip(CHOICES, options), key=lambda lt: len(lt[1]), reverse=True):
        needle = text.rstrip("。")
        if needle:
            reply = reply.replace(needle, letter)
    return reply


def _cascade(text: str, patterns: Sequence[re.Pattern[str]], options: Sequence[str]) -> Extraction:
    for rule, pattern in zip(RULES, patterns):
        m = pattern.search(text)
        if m:
            return Extraction(m.group(1), rule, text)
    return Extraction(CHOICES[closest_option(text, options)], "fuzzy", text)


def extract_mmlu(reply: str, options: Sequence[str]) -> Extraction:
    """The official MMLU chat cascade on ``reply``, with the rule that decided."""
    return _cascade(rewrite_reply_mmlu(reply, options), _EN_PATTERNS, options)


def extract_ceval(reply: str, question: str, options: Sequence[str]) -> Extraction:
    """The official C-Eval chat cascade on ``reply`` (also used for CMMLU), with the rule that decided."""
    return _cascade(rewrite_reply_ceval(reply, question, options), _ZH_PATTERNS, options)


def extract_choice_mmlu(reply: str, options: Sequence[str]) -> str:
    """The letter the official MMLU chat script reads from ``reply`` (always one of A-D)."""
    return extract_mmlu(reply, options).letter


def extract_choice_ceval(reply: str, question: str, options: Sequence[str]) -> str:
    """The letter the official C-Eval chat script reads from ``reply`` (always one of A-D)."""
    return extract_ceval(reply, question, options).letter


def extract_choice_cmmlu(reply: str, question: str, options: Sequence[str]) -> str:
    """CMMLU (no official chat script): the C-Eval extraction."""
    return extract_ceval(reply, question, options).letter


def extract(task: str, reply: str, item: Item) -> Extraction:
    if task == "mmlu":
        return extract_mmlu(reply, item.options)
    if task in ("ceval", "cmmlu"):
        return extract_ceval(reply, item.question, item.options)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


# ------------------------------------------------------------------------------------ fuzzy fallback
_LATIN1 = {i: None for i in range(128, 256)}
_FUZZ_MISSING = ("this reply matched none of the answer patterns, and choosing the closest option needs "
                 "thefuzz (the official scripts' fuzzy matcher): pip install 'thefuzz==0.22.1'")


def closest_option(text: str, options: Sequence[str]) -> int:
    """Index of the option closest to ``text``: ``thefuzz.process.extractOne(text, options)``, as the official
    scripts call it (WRatio on lower-cased alphanumerics; ties and all-zero scores go to the first; of two
    equal option texts the first).

    Without thefuzz, the same computation through rapidfuzz (which thefuzz 0.22 wraps: the query
    normalised once by ``default_process``, then query and options by rapidfuzz with Latin-1 characters
    dropped, WRatio, cutoff 0); tests check both give the same index.
    """
    choices = list(options)
    try:
        from thefuzz import process
    except ImportError:
        best = _closest_with_rapidfuzz(text, choices)
    else:
        best = process.extractOne(text, choices)[0]
    return choices.index(best)


def _closest_with_rapidfuzz(text: str, choices: list[str]) -> str:
    try:
        from rapidfuzz import fuzz, process, utils
    except ImportError:
        raise ImportError(_FUZZ_MISSING) from None

    def normalise(s: str) -> str:
        return utils.default_process(str(s).translate(_LATIN1))

    res = process.extractOne(utils.default_process(text), choices, processor=normalise, scorer=fuzz.WRatio,
                             score_cutoff=0)
    return res[0]


# ---------------------------------------------------------------------------------------------- run
def _default_max_new_tokens(model: Any) -> int:
    # The official scripts keep the checkpoint's generation_config (max_new_tokens 512 for the chat models).
    cfg = getattr(model, "generation_config", None)
    value = cfg.get("max_new_tokens") if isinstance(cfg, dict) else getattr(cfg, "max_new_tokens", None)
    return int(value) if value else DEFAULT_MAX_NEW_TOKENS


def evaluate_subject(model: Any, tokenizer: Any, task: str, items: Sequence[Item], *, batch_size: int,
                     max_new_tokens: int, system: str, cache_file: Path | None,
                     on_batch: Callable[[int], None] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Per-item records {index, reply, pred, rule, answer, correct, ...}, from the cache where present, and
    how many were generated now. Cached records made with another max_new_tokens or system are redone."""
    queries = [chat_query(task, it) for it in items]
    done = {i: r for i, r in (_read_cache(cache_file) if cache_file else {}).items()
            if r.get("max_new_tokens") == max_new_tokens and r.get("system") == system and i < len(items)}
    todo = [i for i in range(len(items)) if i not in done]
    if on_batch and done:
        on_batch(len(done))
    if cache_file and todo:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
    # Longest prompts first, so that the rows of a batch have similar lengths (less padding).
    lengths = {i: len(tokenizer.encode(queries[i])) for i in todo}
    todo.sort(key=lambda i: -lengths[i])
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        replies = generation.chat_complete(model, tokenizer, [queries[i] for i in batch], system=system,
                                           max_new_tokens=max_new_tokens, batch_size=len(batch), **GREEDY)
        lines = []
        for i, reply in zip(batch, replies):
            reply = reply.strip()  # model.chat returns the reply stripped
            ex = extract(task, reply, items[i])
            answer = items[i].answer
            rec = {"index": i, "pred": ex.letter, "answer": answer,
                   "correct": None if answer is None else ex.letter == answer, "rule": ex.rule, "reply": reply,
                   "max_new_tokens": max_new_tokens, "system": system}
            done[i] = rec
            lines.append(json.dumps(rec, ensure_ascii=False))
        if cache_file:
            with open(cache_file, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        if on_batch:
            on_batch(len(batch))
    return [done[i] for i in range(len(items))], len(todo)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run(model: Any, tokenizer: Any, task: str, data: str | os.PathLike, output: str | os.PathLike, *,
        limit: int | None = None, batch_size: int = 8, subjects: Sequence[str] | None = None,
        progress: bool = True, model_label: str = "model", max_new_tokens: int | None = None,
        system: str = DEFAULT_SYSTEM) -> dict[str, Any]:
    """Evaluate a chat model 0-shot on ``task``; writes items/, results-{task}-chat.json and .md to ``output``.

    ``max_new_tokens`` None: the model's generation_config value (512 for the released chat models).
    """
    if task not in SPECS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    spec = SPECS[task]
    root, out = Path(data), Path(output)
    if not root.is_dir():
        raise EvalDataError(f"{root}: not a directory (the {task} data: a {spec.score_split}/ folder of CSV files)")
    names = list(subjects) if subjects else spec.subjects()
    unknown = [s for s in names if s not in spec.subjects()]
    if unknown:
        raise EvalDataError(f"unknown {task} subjects {unknown}")
    new_tokens = _default_max_new_tokens(model) if max_new_tokens is None else int(max_new_tokens)
    loaded = {s: read_items(spec, spec.file(root, spec.score_split, s))[:limit] for s in names}
    total = sum(len(items) for items in loaded.values())
    bar = progress_bar(total, f"{task}-chat", progress, unit="item")
    start = time.perf_counter()
    per_subject: dict[str, list[dict[str, Any]]] = {}
    generated = 0
    try:
        for s, items in loaded.items():
            per_subject[s], n = evaluate_subject(
                model, tokenizer, task, items, batch_size=batch_size, max_new_tokens=new_tokens, system=system,
                cache_file=out / "items" / f"{task}-chat" / "0-shot" / f"{s}.jsonl", on_batch=bar.update)
            generated += n
    finally:
        bar.close()
    result = aggregate(task, per_subject)
    rules = Counter(r["rule"] for recs in per_subject.values() for r in recs)
    result.update(task=task, chat=True, model=model_label, shots=0, items=total, generated=generated,
                  seconds=round(time.perf_counter() - start, 2), split=spec.score_split, limit=limit,
                  max_new_tokens=new_tokens, system=system, rules={k: rules[k] for k in RULES if rules[k]})
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / f"results-{task}-chat.json", json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    # The table's task column says "-chat", so that base and chat rows can stand in one table.
    _write_atomic(out / f"results-{task}-chat.md", markdown_table([{**result, "task": f"{task}-chat"}]))
    return result


__all__ = ["CHAT_INSTRUCTION_MMLU", "RULES", "Extraction", "chat_query", "rewrite_reply_mmlu", "rewrite_reply_ceval",
           "extract_mmlu", "extract_ceval", "extract_choice_mmlu", "extract_choice_ceval", "extract_choice_cmmlu",
           "extract", "closest_option", "evaluate_subject", "run"]
