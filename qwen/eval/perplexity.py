"""Perplexity by context length, with the long-context methods on and off (the model cards' long-context rows).

For each length L the text's tokens are cut into consecutive windows of L tokens (at most ``windows``
of them); each window runs as one sequence from its first token, and the perplexity is
exp(mean NLL) over every predicted token of every window. Each setting toggles the config flags the
model reads at every forward: ``plain`` (neither), ``ntk`` (dynamic NTK: RoPE base stretched once
the sequence exceeds ``seq_length``), ``ntk+logn`` (and LogN query scaling beyond ``seq_length``),
``ntk+logn+window`` (and window attention on the lower half of the layers, window ``seq_length`` by
default: our design of the unreleased method, docs/long-context.md). Below ``seq_length`` all
settings coincide (alpha 1, factors 1, a window that covers the whole sequence), which the table shows.

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

# setting: (use_dynamic_ntk, use_logn_attn, use_window_attn)
SETTINGS = {"plain": (False, False, False), "ntk": (True, False, False), "ntk+logn": (True, True, False),
            "ntk+logn+window": (True, True, True)}
_WINDOW_FIELDS = ("use_dynamic_ntk", "use_logn_attn", "use_window_attn", "window_size", "window_layers",
                  "window_sizes")
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
                         settings: Sequence[str] = tuple(SETTINGS), progress: bool = True,
                         window_size: int | None = None) -> dict[str, Any]:
    """{setting: {length: perplexity}} plus the window counts; the model's flags are restored afterwards.

    ``window_size``: the attention window of the ``+window`` setting (default: the model's seq_length),
    applied to the lower half of the layers."""
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    if window_size is not None and window_size < 1:
        raise ValueError(f"window_size must be a positive number of tokens, got {window_size}")
    cfg = model.config
    saved = {name: getattr(cfg, name) for name in _WINDOW_FIELDS}
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
            cfg.use_dynamic_ntk, cfg.use_logn_attn, cfg.use_window_attn = SETTINGS[name]
            if cfg.use_window_attn:  # the flags are read at every forward; each window builds its own cache
                cfg.window_size, cfg.window_layers, cfg.window_sizes = window_size or cfg.seq_length, None, None
            table[name] = {}
            for length, chunks in plan.items():
                nll, count = 0.0, 0
                for w in chunks:
                    s, c = window_nll(model, w)
                    nll, count = nll + s, count + c
                    bar.update(1)
                table[name][length] = math.exp(nll / count)
    finally:
        for field, value in saved.items():
            setattr(cfg, field, value)
        bar.close()
    out = {"task": "ppl", "seq_length": cfg.seq_length, "windows": {L: len(c) for L, c in plan.items()},
           "perplexity": table}
    if any(SETTINGS[name][2] for name in settings):
        out["attention_window"] = {"size": window_size or cfg.seq_length, "layers": cfg.num_hidden_layers // 2}
    return out


def markdown_table(result: dict[str, Any]) -> str:
    lengths = sorted({L for row in result["perplexity"].values() for L in row})
    lines = ["| setting | " + " | ".join(str(L) for L in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for name, row in result["perplexity"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[L]:.2f}" if L in row else "" for L in lengths) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["SETTINGS", "PerplexityDataError", "read_text_tokens", "window_nll", "perplexity_by_length",
           "markdown_table"]
