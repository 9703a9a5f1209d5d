"""MMLU, C-Eval and CMMLU for base models, as the official eval/ scripts score them.

Prompt (the official ``format_example`` / ``generate_few_shot_prompt``), per task:

- MMLU: ``"The following are multiple choice questions (with answers) about {subject words}.\\n\\n"``,
  then k dev items ``"Question: {q}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {X}\\n\\n"``, then the
  item with ``"\\nAnswer:"``; choices scored on the tokens of ``" A" " B" " C" " D"`` (leading space).
- C-Eval and CMMLU: no header; ``"问题：{q}\\nA. ...\\n答案：{X}\\n\\n"`` shots, ``"\\n答案："`` at the end;
  choices scored on the tokens of ``"A" "B" "C" "D"``.

Scoring: one forward pass per item (the few-shot prefix's KV cache computed once per subject and
reused, or left-padded batches of whole prompts), the logits of the last position, softmax over the
vocabulary, the four choice tokens' probabilities renormalised, argmax. Aggregation: MMLU
micro (every question counts once, per category too); C-Eval and CMMLU macro (the mean of the
subjects' accuracies; per category the mean over its subjects; C-Eval also the Hard set).

Splits scored: MMLU test, C-Eval val (the official script: C-Eval's test answers are not public),
CMMLU test; shots from dev, in file order.

Resumable: every scored item is appended to ``{output}/items/{task}/{shots}-shot/{subject}.jsonl``
before the next batch runs, and a rerun with the same output directory scores only what is missing.
Where we differ from the official scripts: docs/evaluation.md.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..checkpoint import progress_bar
from .subjects import CEVAL_HARD, CEVAL_SUBJECTS, CMMLU_SUBCATEGORIES, MMLU_CATEGORIES, cmmlu_category_subjects

CHOICES = ("A", "B", "C", "D")
TASKS = ("mmlu", "ceval", "cmmlu")


class EvalDataError(ValueError):
    """Evaluation data that cannot be used (names the file and the row)."""


@dataclass(frozen=True)
class Item:
    question: str
    options: tuple[str, str, str, str]
    answer: str | None  # "A".."D"; None where the split has no answers


@dataclass(frozen=True)
class TaskSpec:
    name: str
    score_split: str
    question_key: str
    answer_key: str
    header: bool  # the CSVs have a header row
    question_label: str
    answer_label: str
    choice_prefix: str  # what precedes the letter in the scored choice token

    def subjects(self) -> list[str]:
        if self.name == "mmlu":
            return [s for subs in MMLU_CATEGORIES.values() for s in subs]
        return list(CEVAL_SUBJECTS if self.name == "ceval" else CMMLU_SUBCATEGORIES)

    def file(self, root: Path, split: str, subject: str) -> Path:
        if self.name == "cmmlu":
            return root / split / f"{subject}.csv"
        return root / split / f"{subject}_{split}.csv"


SPECS = {
    "mmlu": TaskSpec("mmlu", "test", "question", "answer", False, "Question: ", "Answer:", " "),
    "ceval": TaskSpec("ceval", "val", "question", "answer", True, "问题：", "答案：", ""),
    "cmmlu": TaskSpec("cmmlu", "test", "Question", "Answer", True, "问题：", "答案：", ""),
}


# -------------------------------------------------------------------------------------------- data
def read_items(spec: TaskSpec, path: Path) -> list[Item]:
    """The items of one CSV file, cells kept as the file's text (see docs/evaluation.md)."""
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file (expected the {spec.name} layout: "
                            f"{spec.file(Path('DATA'), 'dev', '<subject>')})")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    items: list[Item] = []
    if spec.header:
        if not rows:
            raise EvalDataError(f"{path}: empty file")
        head = rows[0]
        missing = [c for c in (spec.question_key, *CHOICES) if c not in head]
        if missing:
            raise EvalDataError(f"{path}: row 1: missing column(s) {missing} (header: {head})")
        col = {name: head.index(name) for name in head}
        body = list(enumerate(rows[1:], 2))
    else:
        col = {"question": 0, "A": 1, "B": 2, "C": 3, "D": 4, "answer": 5}
        body = list(enumerate(rows, 1))
    for lineno, row in body:
        if not row:
            continue
        if len(row) < max(col.get(k, 0) for k in (spec.question_key, *CHOICES)) + 1:
            raise EvalDataError(f"{path}: row {lineno}: {len(row)} fields, expected a question and 4 options")
        answer = row[col[spec.answer_key]].strip() if spec.answer_key in col and col[spec.answer_key] < len(row) else ""
        if answer and answer not in CHOICES:
            raise EvalDataError(f"{path}: row {lineno}: answer {answer!r} is not one of A, B, C, D")
        items.append(Item(row[col[spec.question_key]], tuple(row[col[c]] for c in CHOICES),  # type: ignore[arg-type]
                          answer or None))
    return items


# ------------------------------------------------------------------------------------------ prompts
def format_item(spec: TaskSpec, item: Item, with_answer: bool) -> str:
    text = spec.question_label + item.question
    for letter, option in zip(CHOICES, item.options):
        text += f"\n{letter}. {option}"
    if with_answer:
        if item.answer is None:
            raise EvalDataError(f"a {spec.name} few-shot example has no answer: {item.question[:60]!r}")
        space = " " if spec.name == "mmlu" else ""  # "Answer: B" but "答案：B"
        return text + f"\n{spec.answer_label}{space}{item.answer}\n\n"
    return text + f"\n{spec.answer_label}"


def few_shot_prefix(spec: TaskSpec, subject: str, dev: Sequence[Item], shots: int) -> str:
    """The official prefix: MMLU's subject header, then ``shots`` dev items (-1: all of them)."""
    prefix = ""
    if spec.name == "mmlu":
        prefix = f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"
    k = len(dev) if shots == -1 else shots
    if k > len(dev):
        raise EvalDataError(f"{spec.name}/{subject}: {shots} shots asked, the dev split has {len(dev)} items")
    return prefix + "".join(format_item(spec, it, True) for it in dev[:k])


def build_prompts(spec: TaskSpec, subject: str, dev: Sequence[Item], items: Sequence[Item], shots: int) -> list[str]:
    prefix = few_shot_prefix(spec, subject, dev, shots) if shots else ""
    return [prefix + format_item(spec, it, False) for it in items]


def choice_token_ids(spec: TaskSpec, tokenizer: Any) -> list[int]:
    ids = []
    for letter in CHOICES:
        toks = tokenizer.encode(spec.choice_prefix + letter)
        if len(toks) != 1:
            raise EvalDataError(f"{spec.choice_prefix + letter!r} is {len(toks)} tokens for this tokenizer, expected 1")
        ids.append(toks[0])
    return ids


# ------------------------------------------------------------------------------------------ scoring
def score_prompts(model: Any, tokenizer: Any, prompts: Sequence[str], choice_ids: Sequence[int],
                  max_seq_len: int = 2048) -> list[list[float]]:
    """For each prompt, the renormalised probabilities of the four choice tokens after it (one left-padded
    forward for the batch; prompts longer than ``max_seq_len`` keep their last ``max_seq_len`` tokens)."""
    import torch

    seqs = [tokenizer.encode(p)[-max_seq_len:] for p in prompts]
    width = max(len(s) for s in seqs)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else pad
    device = next(model.parameters()).device
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    with torch.no_grad():
        out = model(ids.to(device), attention_mask=mask.to(device), logits_to_keep=1)
    probs = out.logits[:, -1].float().softmax(-1)[:, list(choice_ids)]
    probs = probs / probs.sum(-1, keepdim=True)
    return probs.cpu().tolist()


def score_with_prefix_cache(model: Any, tokenizer: Any, prefix: str, suffixes: Sequence[str],
                            choice_ids: Sequence[int], max_seq_len: int = 2048) -> list[list[float]] | None:
    """``score_prompts`` for prompts that share the few-shot ``prefix``: its KV cache is computed once and
    each item runs only its own tokens (5-shot prompts are mostly prefix). None when it would not give
    the same numbers (the tokens of prefix + item differ from prefix tokens + item tokens, a prompt
    exceeds ``max_seq_len``, or dynamic NTK would rescale at these lengths): then batches are used."""
    import torch

    from ..cache import KVCache

    head = tokenizer.encode(prefix)
    tails = [tokenizer.encode(t) for t in suffixes]
    longest = len(head) + max(len(t) for t in tails)
    cfg = model.config
    if longest > max_seq_len or (cfg.use_dynamic_ntk and longest > cfg.seq_length):
        return None
    for text, tail in zip(suffixes, tails):
        if tokenizer.encode(prefix + text) != head + tail:
            return None
    device = next(model.parameters()).device
    cache = KVCache.for_model(model, 1, longest)
    if any(w is not None and len(head) + len(t) > w for w in cfg.layer_windows for t in tails):
        return None  # window attention: a ring would wrap past the shared prefix; score whole prompts
    out = []
    with torch.no_grad():
        model(torch.tensor([head], device=device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        for tail in tails:
            logits = model(torch.tensor([tail], device=device), past_key_values=cache, use_cache=True,
                           logits_to_keep=1).logits[0, -1]
            p = logits.float().softmax(-1)[list(choice_ids)]
            out.append((p / p.sum()).cpu().tolist())
            cache.crop(len(head))
    return out


def _read_cache(path: Path) -> dict[int, dict[str, Any]]:
    done: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interrupted write: rescored
                continue
            done[int(rec["index"])] = rec
    return done


def evaluate_subject(model: Any, tokenizer: Any, spec: TaskSpec, subject: str, dev: Sequence[Item],
                     items: Sequence[Item], shots: int, batch_size: int, cache_file: Path | None,
                     on_batch: Callable[[int], None] | None = None, max_seq_len: int = 2048,
                     prefix_cache: bool = True) -> list[dict[str, Any]]:
    """Per-item records {index, pred, answer, correct, probs}, from the cache where present."""
    prefix = few_shot_prefix(spec, subject, dev, shots) if shots else ""
    questions = [format_item(spec, it, False) for it in items]
    prompts = [prefix + q for q in questions]
    choice_ids = choice_token_ids(spec, tokenizer)
    done = _read_cache(cache_file) if cache_file else {}
    todo = [i for i in range(len(items)) if i not in done]
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
    if on_batch and len(items) - len(todo):
        on_batch(len(items) - len(todo))
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        probs = None
        if prefix and prefix_cache:
            probs = score_with_prefix_cache(model, tokenizer, prefix, [questions[i] for i in batch], choice_ids,
                                            max_seq_len)
        if probs is None:
            probs = score_prompts(model, tokenizer, [prompts[i] for i in batch], choice_ids, max_seq_len)
        lines = []
        for i, p in zip(batch, probs):
            pred = CHOICES[max(range(4), key=lambda j: p[j])]
            answer = items[i].answer
            rec = {"index": i, "pred": pred, "answer": answer, "correct": None if answer is None else pred == answer,
                   "probs": [round(x, 6) for x in p]}
            done[i] = rec
            lines.append(json.dumps(rec))
        if cache_file:
            with open(cache_file, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        if on_batch:
            on_batch(len(batch))
    return [done[i] for i in range(len(items))]


# -------------------------------------------------------------------------------------- aggregation
def aggregate(task: str, per_subject: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Accuracy in percent: per subject, per category and overall, averaged as the official scripts do."""
    subj = {}
    for name, recs in per_subject.items():
        scored = [r for r in recs if r["correct"] is not None]
        if scored:
            subj[name] = {"n": len(scored), "correct": sum(r["correct"] for r in scored),
                          "acc": 100.0 * sum(r["correct"] for r in scored) / len(scored)}
    result: dict[str, Any] = {"task": task, "subjects": subj, "categories": {}}
    if not subj:
        result["average"] = math.nan
        return result
    if task == "mmlu":  # micro: questions, not subjects, are averaged
        for cat, names in MMLU_CATEGORIES.items():
            n = sum(subj[s]["n"] for s in names if s in subj)
            if n:
                result["categories"][cat] = 100.0 * sum(subj[s]["correct"] for s in names if s in subj) / n
        result["average"] = 100.0 * sum(v["correct"] for v in subj.values()) / sum(v["n"] for v in subj.values())
        return result
    if task == "ceval":
        groups: dict[str, list[str]] = {}
        for s in subj:
            groups.setdefault(CEVAL_SUBJECTS[s][2], []).append(s)
        order = ["STEM", "Social Science", "Humanities", "Other"]
        result["categories"] = {c: _mean(subj[s]["acc"] for s in groups[c]) for c in order if c in groups}
        hard = [s for s in CEVAL_HARD if s in subj]
        if hard:
            result["hard"] = _mean(subj[s]["acc"] for s in hard)
    else:
        for cat, names in cmmlu_category_subjects().items():
            present = [s for s in names if s in subj]
            if present:
                result["categories"][cat] = _mean(subj[s]["acc"] for s in present)
    result["average"] = _mean(v["acc"] for v in subj.values())
    return result


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per run (label = its model), the overall and category accuracies, like the model cards."""
    cats: list[str] = []
    for r in results:
        cats += [c for c in r["categories"] if c not in cats]
    extra = ["Hard"] if any("hard" in r for r in results) else []
    head = "| model | task | average | " + " | ".join(cats + extra) + " |"
    lines = [head, "|" + "---|" * (3 + len(cats) + len(extra))]
    for r in results:
        cells = [f"{r['categories'][c]:.2f}" if c in r["categories"] else "" for c in cats]
        cells += [f"{r['hard']:.2f}" if "hard" in r else ""] if extra else []
        lines.append(f"| {r.get('model', '')} | {r['task']} | {r['average']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- run
def run(model: Any, tokenizer: Any, task: str, data: str | os.PathLike, output: str | os.PathLike, shots: int = 5,
        batch_size: int = 8, limit: int | None = None, subjects: Sequence[str] | None = None,
        progress: bool = True, model_label: str = "", max_seq_len: int = 2048,
        prefix_cache: bool = True) -> dict[str, Any]:
    """Score ``task`` on the data directory ``data``; writes items/, results.json and results.md to ``output``."""
    if task not in SPECS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    spec = SPECS[task]
    root, out = Path(data), Path(output)
    if not root.is_dir():
        raise EvalDataError(f"{root}: not a directory (the {task} data: dev/ and {spec.score_split}/ CSV folders)")
    names = list(subjects) if subjects else spec.subjects()
    unknown = [s for s in names if s not in spec.subjects()]
    if unknown:
        raise EvalDataError(f"unknown {task} subjects {unknown}")
    loaded = {s: (read_items(spec, spec.file(root, "dev", s)) if shots else [],
                  read_items(spec, spec.file(root, spec.score_split, s))[:limit]) for s in names}
    total = sum(len(items) for _, items in loaded.values())
    bar = progress_bar(total, task, progress, unit="item")
    start = time.perf_counter()
    per_subject = {}
    for s, (dev, items) in loaded.items():
        per_subject[s] = evaluate_subject(model, tokenizer, spec, s, dev, items, shots, batch_size,
                                          out / "items" / task / f"{shots}-shot" / f"{s}.jsonl", on_batch=bar.update,
                                          max_seq_len=max_seq_len, prefix_cache=prefix_cache)
    bar.close()
    result = aggregate(task, per_subject)
    result.update(model=model_label, shots=shots, items=total, seconds=round(time.perf_counter() - start, 2),
                  split=spec.score_split, limit=limit, prefix_cache=prefix_cache)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".results-{task}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / f"results-{task}.json")
    (out / f"results-{task}.md").write_text(markdown_table([result]), encoding="utf-8")
    return result


__all__ = ["TASKS", "SPECS", "Item", "EvalDataError", "read_items", "format_item", "few_shot_prefix",
           "build_prompts", "choice_token_ids", "score_prompts", "score_with_prefix_cache", "evaluate_subject", "aggregate", "markdown_table",
           "run"]
