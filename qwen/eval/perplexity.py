"""Perplexity by context length, with the long-context methods on and off (the model cards' long-context rows).

For each length L the text's tokens are cut into consecutive windows of L tokens (at most ``windows``
of them); each window runs as one sequence from its first token, and the perplexity is
exp(mean NLL) over every predicted token of every window. Each setting toggles the config flags the
model reads at every forward: ``plain`` (neither), ``ntk`` (dynamic NTK: RoPE base stretched once
the sequence exceeds ``seq_length``), ``ntk+logn`` (and LogN query scaling beyond ``seq_length``).
Below ``seq_length`` all settings coincide (alpha 1, factors 1), which the table shows.

The logits of a long window are never materialised at once: the final hidden states go through the
head a slice of rows at a time (a 16k-token window of a 152k-word vocabulary would need 10 GB).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ..checkpoint import progress_bar

SETTINGS = {"plain": (False, False), "ntk": (True, False), "ntk+logn": (True, True)}
_HEAD_ROWS = 256


class PerplexityDataError(ValueError):
    """A text that cannot give the windows asked for (names the file)."""


def read_text_tokens(path: str | os.PathLike, tokenizer: Any) -> list[int]:
    """The tokens of a text file (plain text, or JSONL of {"text": ...} records joined by <|endoftext|>)."""
    from ..data import encode_text, read_records

    p = Path(path)
    if p.suffix.lower() in (".jsonl", ".json"):
        records = read_records(p)
        ids: list[int] = []
        for r in records:
            if r.kind != "text":
                raise PerplexityDataError(f"{r.source}: perplexity needs documents ({{'text': ...}}), not chats")
            ids += encode_text(tokenizer, r)
        return ids
    if not p.is_file():
        raise PerplexityDataError(f"{p}: no such file")
    return list(tokenizer.encode(p.read_text(encoding="utf-8"), allowed_special=set(), disallowed_special=()))


@torch.no_grad()
def window_nll(model: Any, ids: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token NLL, number of predicted tokens) of one window [T]."""
    device = next(model.parameters()).device
    out = model(ids[None].to(device), output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][0, :-1]  # after ln_f; the last position predicts nothing here
    targets = ids[1:].to(device)
    nll = 0.0
    for i in range(0, len(targets), _HEAD_ROWS):
        logits = model.lm_head(hidden[i : i + _HEAD_ROWS]).float()
        nll += float(torch.nn.functional.cross_entropy(logits, targets[i : i + _HEAD_ROWS], reduction="sum"))
    return nll, len(targets)


def perplexity_by_length(model: Any, tokens: Sequence[int], lengths: Sequence[int], windows: int = 4,
                         settings: Sequence[str] = tuple(SETTINGS), progress: bool = True) -> dict[str, Any]:
    """{setting: {length: perplexity}} plus the window counts; the model's flags are restored afterwards."""
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    cfg = model.config
    saved = (cfg.use_dynamic_ntk, cfg.use_logn_attn)
    ids = torch.tensor(list(tokens), dtype=torch.long)
    plan = {}
    for length in lengths:
        n = min(windows, len(ids) // length)
        if n == 0:
            raise PerplexityDataError(f"the text has {len(ids)} tokens: not one window of {length}")
        plan[length] = [ids[k * length : (k + 1) * length] for k in range(n)]
    total = sum(len(w) for w in plan.values()) * len(settings)
    bar = progress_bar(total, "ppl", progress, unit="window")
    table: dict[str, dict[int, float]] = {}
    try:
        for name in settings:
            cfg.use_dynamic_ntk, cfg.use_logn_attn = SETTINGS[name]
            table[name] = {}
            for length, chunks in plan.items():
                nll, count = 0.0, 0
                for w in chunks:
                    s, c = window_nll(model, w)
                    nll, count = nll + s, count + c
                    bar.update(1)
                table[name][length] = math.exp(nll / count)
    finally:
        cfg.use_dynamic_ntk, cfg.use_logn_attn = saved
        bar.close()
    return {"task": "ppl", "seq_length": cfg.seq_length, "windows": {L: len(c) for L, c in plan.items()},
            "perplexity": table}


def markdown_table(result: dict[str, Any]) -> str:
    lengths = sorted({L for row in result["perplexity"].values() for L in row})
    lines = ["| setting | " + " | ".join(str(L) for L in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for name, row in result["perplexity"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[L]:.2f}" if L in row else "" for L in lengths) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["SETTINGS", "PerplexityDataError", "read_text_tokens", "window_nll", "perplexity_by_length",
           "markdown_table"]
