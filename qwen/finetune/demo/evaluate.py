"""The demo model's bars, computed for real: exact match on held-out items, the model card's
prompts, and held-out perplexity next to a unigram baseline.

Decoding is greedy and unpenalised: the model's generation config (or the defaults) with
``do_sample=False, repetition_penalty=1.0, top_k=0, top_p=1.0, temperature=1.0``.

* ``chat`` items go through ``model.chat(tokenizer, prompt, history=None, generation_config=...)``
  (the default system prompt); the reply must equal the answer exactly.
* ``completion`` items are raw continuations: ``model.generate`` on the tokenised prompt (raw
  format, stopping at ``<|endoftext|>``); the continuation must start with the answer.

Bars (``results["bars"]``):

``addis_ababa``   the model card's base-model prompt continues with ``亚的斯亚贝巴（Addis Ababa）``
``greeting_zh``   ``model.chat(tokenizer, "你好")`` has Chinese characters and 你好 or 您好
``greeting_en``   ``model.chat(tokenizer, "Hello")`` has Latin letters, no Chinese, and Hello or Hi
``exact_match``   overall (micro-averaged) exact match on the held-out items >= 0.9
``perplexity``    held-out perplexity below the unigram baseline's (reported side by side)

Perplexity: each held-out document is tokenised (special-token text as plain text) and followed by
``<|endoftext|>``; the documents are concatenated and cut into blocks of the model's
``seq_length``; every token of a block but the first is predicted from the block prefix with a
softmax over the full vocabulary (all ``vocab_size`` logits). The result is exp of the
token-weighted mean negative log-likelihood (at most ``max_tokens_per_source`` tokens per source,
50,000 by default: the full-vocabulary softmax dominates the cost on CPU). The unigram baseline scores exactly the same tokens
with add-one smoothing over the same full vocabulary: p(t) = (count(t) + 1) / (N + V), counts from
``train_token_counts`` (see :func:`count_tokens`).
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .synthetic import EN_GREETING_REPLY, ZH_GREETING_REPLY, EvalItem

ADDIS_PROMPT = ("蒙古国的首都是乌兰巴托（Ulaanbaatar）\n冰岛的首都是雷克雅未克（Reykjavik）\n"
                "埃塞俄比亚的首都是")
ADDIS_ANSWER = "亚的斯亚贝巴（Addis Ababa）"
EXACT_MATCH_BAR = 0.9
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def greedy_config(model: Any, *, chat_format: str = "chatml", max_new_tokens: int = 64) -> Any:
    """The model's generation config made greedy and unpenalised (see module docstring)."""
    from qwen.generation_config import GenerationConfig, _as_generation_config

    base = getattr(model, "generation_config", None)
    cfg = _as_generation_config(base).copy() if base is not None else GenerationConfig()
    cfg.update(do_sample=False, repetition_penalty=1.0, top_k=0, top_p=1.0, temperature=1.0, min_p=None,
               presence_penalty=0.0, frequency_penalty=0.0, chat_format=chat_format, max_new_tokens=max_new_tokens,
               seed=None)
    if chat_format == "raw":
        cfg.update(stop_words_ids=None, stop_strings=None)
    return cfg


def _budget(tokenizer: Any, answer: str) -> int:
    return min(256, 2 * len(tokenizer.encode(answer)) + 8)


def chat_reply(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 64) -> str:
    """One greedy ``model.chat`` turn without history."""
    cfg = greedy_config(model, chat_format="chatml", max_new_tokens=max_new_tokens)
    chat = getattr(model, "chat", None)
    if chat is None:  # a bare nn.Module (test stubs): the same function model.chat calls
        from qwen.chat import chat as chat_fn

        response, _ = chat_fn(model, tokenizer, prompt, history=None, generation_config=cfg)
    else:
        response, _ = chat(tokenizer, prompt, history=None, generation_config=cfg)
    return response


def complete(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 32) -> str:
    """Greedy raw continuation of ``prompt`` (text after the prompt, cut at ``<|endoftext|>``)."""
    from qwen.generate import _decodable_guard

    cfg = greedy_config(model, chat_format="raw", max_new_tokens=max_new_tokens)
    ids = tokenizer.encode(prompt)
    device = getattr(model, "device", torch.device("cpu"))
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    generate = getattr(model, "generate", None)
    kwargs = dict(generation_config=cfg, max_new_tokens=max_new_tokens, logits_processor=_decodable_guard(model, tokenizer))
    if generate is None:
        from qwen.generate import generate as generate_fn

        out = generate_fn(model, input_ids, **kwargs)
    else:
        out = generate(input_ids, **kwargs)
    new = [int(t) for t in out[0, len(ids):].tolist()]
    eod = getattr(tokenizer, "eod_id", None)
    if eod in new:
        new = new[: new.index(eod)]
    return tokenizer.decode(new, errors="replace")


def _score(item: EvalItem, output: str) -> bool:
    if item.kind == "chat":
        return output.strip() == item.answer
    if item.kind == "completion":
        return output.startswith(item.answer)
    raise ValueError(f"unknown eval item kind {item.kind!r}")


def _select(items: Sequence[EvalItem], max_items: int | None) -> list[EvalItem]:
    """The first ``max_items`` items taken round-robin over tasks (every task keeps a share)."""
    if max_items is None or max_items >= len(items):
        return list(items)
    by_task: dict[str, list[EvalItem]] = {}
    for it in items:
        by_task.setdefault(it.task, []).append(it)
    out: list[EvalItem] = []
    i = 0
    while len(out) < max_items:
        for group in by_task.values():
            if i < len(group) and len(out) < max_items:
                out.append(group[i])
        i += 1
    return out


# ================================================================================== perplexity
def _encode_doc(tokenizer: Any, doc: str) -> list[int]:
    return list(tokenizer.encode(doc, allowed_special=set(), disallowed_special=()))


def count_tokens(tokenizer: Any, docs: Iterable[str], *, add_eos: bool = True) -> Counter:
    """Token counts of training documents (each followed by ``<|endoftext|>``, as in perplexity):
    the ``train_token_counts`` for the unigram baseline."""
    counts: Counter = Counter()
    eod = tokenizer.eod_id
    for d in docs:
        counts.update(_encode_doc(tokenizer, d))
        if add_eos:
            counts[eod] += 1
    return counts


def _ppl_stream(tokenizer: Any, docs: Sequence[str], max_tokens: int | None) -> list[int]:
    stream: list[int] = []
    for d in docs:
        stream.extend(_encode_doc(tokenizer, d))
        stream.append(tokenizer.eod_id)
        if max_tokens is not None and len(stream) >= max_tokens:
            return stream[:max_tokens]
    return stream


@torch.no_grad()
def _model_nll(model: Any, stream: list[int], block: int) -> tuple[float, list[int]]:
    """(summed NLL, the predicted target ids) over blocks of ``block`` tokens."""
    device = getattr(model, "device", torch.device("cpu"))
    total = 0.0
    targets: list[int] = []
    for start in range(0, len(stream), block):
        chunk = stream[start:start + block]
        if len(chunk) < 2:
            continue
        ids = torch.tensor([chunk], dtype=torch.long, device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        tgt = ids[0, 1:]
        total += float(F.cross_entropy(logits, tgt, reduction="sum"))
        targets.extend(chunk[1:])
    return total, targets


def _unigram_nll(targets: Sequence[int], counts: Mapping[int, int], vocab_size: int) -> float:
    n = sum(counts.values())
    denom = math.log(n + vocab_size)
    return sum(denom - math.log(counts.get(t, 0) + 1) for t in targets)


def heldout_perplexity(model: Any, tokenizer: Any, heldout_docs: Sequence[str] | Mapping[str, Sequence[str]],
                       train_token_counts: Mapping[int, int] | None = None, *, block_size: int | None = None,
                       max_tokens_per_source: int | None = 50_000, progress: bool = True) -> dict[str, Any]:
    """Model and unigram perplexity on held-out documents (a list, or {source: list} for a
    per-source breakdown); see the module docstring."""
    cfg = getattr(model, "config", None)
    block = int(block_size or getattr(cfg, "seq_length", 0) or 512)
    vocab = int(getattr(cfg, "vocab_size", 0) or tokenizer.vocab_size)
    sources = dict(heldout_docs) if isinstance(heldout_docs, Mapping) else {"all": list(heldout_docs)}
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    out: dict[str, Any] = {"block_size": block, "vocab_size": vocab, "by_source": {}}
    tot_tokens, tot_model, tot_uni = 0, 0.0, 0.0
    try:
        for name, docs in sources.items():
            stream = _ppl_stream(tokenizer, docs, max_tokens_per_source)
            t0 = time.perf_counter()
            nll, targets = _model_nll(model, stream, block)
            row: dict[str, Any] = {"documents": len(docs), "tokens": len(targets)}
            if targets:
                row["model"] = math.exp(nll / len(targets))
                tot_model += nll
                if train_token_counts is not None:
                    uni = _unigram_nll(targets, train_token_counts, vocab)
                    row["unigram"] = math.exp(uni / len(targets))
                    tot_uni += uni
            tot_tokens += len(targets)
            out["by_source"][name] = row
            _log(progress, f"perplexity {name}: {row} ({time.perf_counter() - t0:.1f}s)")
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    out["tokens"] = tot_tokens
    out["model"] = math.exp(tot_model / tot_tokens) if tot_tokens else None
    out["unigram"] = (math.exp(tot_uni / tot_tokens) if tot_tokens and train_token_counts is not None else None)
    if train_token_counts is not None:
        out["unigram_train_tokens"] = int(sum(train_token_counts.values()))
    return out


# ==================================================================================== evaluate
def evaluate_demo(
    model: Any,
    tokenizer: Any,
    eval_items: Sequence[EvalItem | Mapping[str, str]],
    heldout_docs: Sequence[str] | Mapping[str, Sequence[str]],
    train_token_counts: Counter | None = None,
    *,
    max_items: int | None = None,
    progress: bool = True,
    block_size: int | None = None,
    max_tokens_per_source: int | None = 50_000,
    max_failures: int = 25,
    return_items: bool = False,
) -> dict[str, Any]:
    """Exact match per task and overall, the named bars, and held-out perplexity; a JSON-able dict.

    ``eval_items`` are EvalItems or their dicts (``EvalItem.to_dict()``, e.g. read back from JSON).
    ``heldout_docs`` may be a list or {source: list}; ``train_token_counts`` (token id -> count over
    the training text, :func:`count_tokens`) enables the unigram baseline. ``max_items`` keeps a
    round-robin share of every task. ``max_tokens_per_source`` caps the perplexity tokens per source
    (the first documents, in order; None for all). ``return_items`` adds every item's output.
    """
    t_start = time.perf_counter()
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        items = _select([it if isinstance(it, EvalItem) else EvalItem(**it) for it in eval_items], max_items)
        per_task: dict[str, dict[str, int]] = {}
        failures: list[dict[str, str]] = []
        rows: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        with torch.no_grad():
            for k, it in enumerate(items):
                budget = _budget(tokenizer, it.answer)
                if it.kind == "chat":
                    output = chat_reply(model, tokenizer, it.prompt, max_new_tokens=budget)
                else:
                    output = complete(model, tokenizer, it.prompt, max_new_tokens=budget)
                ok = _score(it, output)
                stats = per_task.setdefault(it.task, {"correct": 0, "n": 0})
                stats["n"] += 1
                stats["correct"] += int(ok)
                if not ok and len(failures) < max_failures:
                    failures.append({"task": it.task, "prompt": it.prompt, "expected": it.answer, "got": output})
                if return_items:
                    rows.append({**it.to_dict(), "output": output, "correct": ok})
                if progress and (k + 1) % 25 == 0:
                    _log(progress, f"{k + 1}/{len(items)} items ({time.perf_counter() - t0:.0f}s)")

            addis = complete(model, tokenizer, ADDIS_PROMPT, max_new_tokens=_budget(tokenizer, ADDIS_ANSWER))
            hello_zh = chat_reply(model, tokenizer, "你好", max_new_tokens=_budget(tokenizer, ZH_GREETING_REPLY))
            hello_en = chat_reply(model, tokenizer, "Hello", max_new_tokens=_budget(tokenizer, EN_GREETING_REPLY))
        n = sum(s["n"] for s in per_task.values())
        correct = sum(s["correct"] for s in per_task.values())
        by_task = {t: {**s, "accuracy": s["correct"] / s["n"]} for t, s in sorted(per_task.items())}
        overall = correct / n if n else None
        macro = sum(s["accuracy"] for s in by_task.values()) / len(by_task) if by_task else None
        exact = {"overall": overall, "macro": macro, "correct": correct, "n": n, "by_task": by_task}
        _log(progress, f"exact match {correct}/{n} ({time.perf_counter() - t0:.1f}s)")
    finally:
        if was_training and hasattr(model, "train"):
            model.train()

    ppl = heldout_perplexity(model, tokenizer, heldout_docs, train_token_counts, block_size=block_size,
                             max_tokens_per_source=max_tokens_per_source, progress=progress)
    bars = {
        "addis_ababa": {"passed": addis.startswith(ADDIS_ANSWER), "prompt": ADDIS_PROMPT, "expected": ADDIS_ANSWER,
                        "output": addis},
        "greeting_zh": {"passed": is_chinese_greeting(hello_zh), "prompt": "你好", "output": hello_zh},
        "greeting_en": {"passed": is_english_greeting(hello_en), "prompt": "Hello", "output": hello_en},
        "exact_match": {"passed": overall is not None and overall >= EXACT_MATCH_BAR, "value": overall,
                        "threshold": EXACT_MATCH_BAR},
        "perplexity": {"passed": (ppl["model"] is not None and ppl["unigram"] is not None
                                  and ppl["model"] < ppl["unigram"]),
                       "model": ppl["model"], "unigram": ppl["unigram"]},
    }
    results: dict[str, Any] = {
        "exact_match": exact,
        "bars": bars,
        "all_bars_passed": all(b["passed"] for b in bars.values()),
        "perplexity": ppl,
        "failures": failures,
        "decoding": "greedy (do_sample=False, repetition_penalty=1.0)",
        "elapsed_s": round(time.perf_counter() - t_start, 2),
    }
    if return_items:
        results["items"] = rows
    return results


def is_chinese_greeting(reply: str) -> bool:
    return bool(_CJK.search(reply)) and ("你好" in reply or "您好" in reply)


def is_english_greeting(reply: str) -> bool:
    return (bool(re.search(r"[A-Za-z]", reply)) and not _CJK.search(reply)
            and bool(re.search(r"\b(Hello|Hi)\b", reply, re.IGNORECASE)))


# ====================================================================================== report
def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _cell(text: str, limit: int = 60) -> str:
    text = text.replace("|", "\\|").replace("\n", "⏎")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_report(results: Mapping[str, Any]) -> str:
    """Markdown tables (bars, exact match per task, perplexity) for the model card."""
    lines = ["| bar | result | detail |", "|---|---|---|"]
    for name, b in results["bars"].items():
        if name in ("addis_ababa", "greeting_zh", "greeting_en"):
            prompt = "…" + b["prompt"].rsplit("\n", 1)[-1] if name == "addis_ababa" else b["prompt"]
            detail = f"`{_cell(prompt)}` → `{_cell(b['output'])}`"
        elif name == "exact_match":
            detail = f"{_fmt(b['value'], 3)} (bar ≥ {b['threshold']})"
        else:
            detail = f"model {_fmt(b['model'])} vs unigram {_fmt(b['unigram'])}"
        lines.append(f"| {name} | {'pass' if b['passed'] else 'FAIL'} | {detail} |")
    em = results["exact_match"]
    lines += ["", "| task | correct | n | exact match |", "|---|---:|---:|---:|"]
    for task, s in em["by_task"].items():
        lines.append(f"| {task} | {s['correct']} | {s['n']} | {s['accuracy']:.3f} |")
    lines.append(f"| **overall** | {em['correct']} | {em['n']} | **{_fmt(em['overall'], 3)}** |")
    ppl = results["perplexity"]
    lines += ["", f"Held-out perplexity (blocks of {ppl['block_size']} tokens, softmax over all "
                  f"{ppl['vocab_size']:,} ids; unigram: add-one smoothed over the same vocabulary):", "",
              "| source | documents | tokens | model | unigram |", "|---|---:|---:|---:|---:|"]
    for name, row in ppl["by_source"].items():
        lines.append(f"| {name} | {row['documents']} | {row['tokens']:,} | {_fmt(row.get('model'))} | "
                     f"{_fmt(row.get('unigram'))} |")
    if len(ppl["by_source"]) > 1:
        lines.append(f"| **all** | | {ppl['tokens']:,} | **{_fmt(ppl['model'])}** | **{_fmt(ppl['unigram'])}** |")
    return "\n".join(lines) + "\n"
