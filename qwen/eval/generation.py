"""Batched greedy generation for the generative benchmarks (chat multiple choice, GSM8K, HumanEval, plugin).

The official scripts generate one prompt at a time (``model.generate`` for base models, ``model.chat``
for chat models). Here prompts run in left-padded batches through ``qwen.generate.generate``, whose rows
decode exactly as they would alone (positions count real tokens only), so batching changes the speed,
not the text. Greedy by default, as the official evaluation sets ``do_sample=False``.

- ``complete(model, tokenizer, prompts, ...)``: raw continuations of base-model prompts, cut at the
  first stop string (the stop string itself is removed) or end of text.
- ``chat_complete(model, tokenizer, queries, ...)``: one ChatML turn per query, as ``model.chat`` builds
  it (system prompt, ``<|im_start|>``/``<|im_end|>``), the reply cut at ``<|im_end|>``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..chat_template import DEFAULT_SYSTEM, get_stop_words_ids, make_context
from ..generate import _decodable_guard, generate


def _cut(text: str, stops: Sequence[str]) -> str:
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if s and 0 <= i < cut:
            cut = i
    return text[:cut]


def generate_ids(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 stop_strings: Sequence[str] = (), stop_words_ids: Sequence[Sequence[int]] = (),
                 batch_size: int = 8, max_seq_len: int | None = None,
                 on_batch: Callable[[int], None] | None = None, **gen_kwargs: Any) -> list[list[int]]:
    """New token ids for each prompt (token lists), greedy, ``batch_size`` prompts per left-padded batch.

    A prompt longer than ``max_seq_len - max_new_tokens`` keeps its last tokens (the official scripts
    have no guard; a prompt past the model's context would otherwise fail). Finished rows' padding and
    the eos token are not returned.
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    eod = getattr(tokenizer, "eod_id", None)
    pad = eod if pad is None else pad
    eos_ids = {t for t in (eod, getattr(tokenizer, "im_end_id", None)) if t is not None}
    device = next(model.parameters()).device
    gen_kwargs.setdefault("do_sample", False)
    # As chat() does: never pick an id the tokenizer cannot decode (checkpoints pad the vocabulary).
    gen_kwargs["logits_processor"] = list(gen_kwargs.get("logits_processor") or []) + _decodable_guard(model, tokenizer)
    # Longest first: rows of a batch have similar lengths, so less padding; results go back in order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [list(prompts[i]) for i in idx]
        if max_seq_len is not None:
            keep = max(1, max_seq_len - max_new_tokens)
            seqs = [s[-keep:] for s in seqs]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
        with torch.no_grad():
            res = generate(model, ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                           stop_words_ids=[list(s) for s in stop_words_ids] or None,
                           stop_strings=list(stop_strings) or None, tokenizer=tokenizer,
                           eos_token_id=eod, pad_token_id=pad, **gen_kwargs)
        for r, i in enumerate(idx):
            new = res[r, width:].tolist()
            for j, tok in enumerate(new):
                if tok in eos_ids:
                    new = new[:j]
                    break
            out[i] = new
        if on_batch:
            on_batch(len(idx))
    return [o if o is not None else [] for o in out]


def complete(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 512,
             stop_strings: Sequence[str] = (), batch_size: int = 8, max_seq_len: int | None = 2048,
             on_batch: Callable[[int], None] | None = None, **gen_kwargs: Any) -> list[str]:
    """Greedy continuations of base-model prompts, each cut before the first of ``stop_strings``."""
    ids = [tokenizer.encode(p) for p in prompts]
    new = generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                       batch_size=batch_size, max_seq_len=max_seq_len, on_batch=on_batch, **gen_kwargs)
    return [_cut(tokenizer.decode(n, errors="replace"), stop_strings) for n in new]


def chat_prompt_ids(tokenizer: Any, query: str, history: Sequence[tuple[str, str]] | None = None,
                    system: str = DEFAULT_SYSTEM, max_window_size: int = 6144) -> list[int]:
    """The tokens ``model.chat`` feeds the model for ``query`` (ChatML, as the official make_context)."""
    _, tokens = make_context(tokenizer, query, history=list(history or []), system=system,
                             max_window_size=max_window_size, chat_format="chatml")
    return list(tokens)


def chat_complete(model: Any, tokenizer: Any, queries: Sequence[str], *, system: str = DEFAULT_SYSTEM,
                  max_new_tokens: int = 512, batch_size: int = 8, stop_strings: Sequence[str] = (),
                  on_batch: Callable[[int], None] | None = None, **gen_kwargs: Any) -> list[str]:
    """Greedy one-turn chat replies: what ``model.chat(tokenizer, query, history=None)`` returns, batched
    (stripped, as chat() strips). Sampling settings not given here come from ``model.generation_config``:
    the released chat configs set repetition_penalty 1.1, which the official eval scripts reset to 1.0, so
    the benchmark modules pass ``repetition_penalty=1.0`` explicitly."""
    ids = [chat_prompt_ids(tokenizer, q, system=system) for q in queries]
    new = generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens,
                       stop_words_ids=get_stop_words_ids("chatml", tokenizer), stop_strings=stop_strings,
                       batch_size=batch_size, max_seq_len=None, on_batch=on_batch, **gen_kwargs)
    return [_cut(tokenizer.decode(n, errors="replace"), stop_strings).strip() for n in new]


__all__ = ["generate_ids", "complete", "chat_prompt_ids", "chat_complete"]
