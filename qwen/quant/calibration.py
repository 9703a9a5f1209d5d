"""Calibration sequences for GPTQ, read like the official run_gptq.py reads them.

run_gptq.py takes the fine-tuning data format (a JSON list of ``{"conversations": [...]}``),
renders each sample with finetune.py's ChatML preprocessing, truncates it to ``max_len`` and keeps
only the input ids. We reuse the fine-tuning reader (qwen/data.py), so every format
``qwen train`` accepts works here too: the official SFT JSON (rendered with the official
preprocessing), JSONL chats or ``{"text": ...}`` documents, and plain text (documents concatenated
with <|endoftext|> and cut into ``max_len``-token blocks).

Without a file, the set that ships with the package is used (``DEFAULT_CALIBRATION``, see
qwen/assets/NOTICE): 300 samples written for this package, English and Chinese, prose of many
genres, chats (rendered in ChatML like the official SFT data), source code, worked math, tables and
configuration files, bilingual pairs, about 120k tokens, in an order that mixes the kinds, so that
the first N samples are a balanced subset too. AutoGPTQ and optimum users expect GPTQ to run with
no data argument (they download c4 or wikitext2); nothing is downloaded here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

DEFAULT_CALIBRATION = Path(__file__).resolve().parent.parent / "assets" / "calibration.jsonl"


def load_calibration(path: str | os.PathLike[str] | None, tokenizer: Any, max_len: int = 2048,
                     num_samples: int | None = 128) -> list[torch.Tensor]:
    """Up to ``num_samples`` id sequences (1-D int64 tensors, at most ``max_len`` tokens), in file order.

    ``path=None`` reads the built-in set (DEFAULT_CALIBRATION): one sequence per sample, in file order
    (documents are not packed together, so any prefix keeps the mix of kinds and languages)."""
    from ..data import encode_chat, encode_text, read_records, tokenize_records

    if path is None:
        rows = []
        for record in read_records(DEFAULT_CALIBRATION):
            ids = encode_text(tokenizer, record) if record.kind == "text" else encode_chat(
                tokenizer, record, label_mask="assistant").input_ids  # keeps each sample's own system prompt
            rows.append(ids[:max_len])
    else:
        records = read_records(path)
        data = tokenize_records(tokenizer, records, max_len=max_len, label_mask="official")
        rows = [ex.input_ids for ex in data.examples]
    rows = [ids for ids in rows if len(ids) >= 2]
    if num_samples is not None:
        rows = rows[:num_samples]
    return [torch.tensor(ids, dtype=torch.long) for ids in rows]


__all__ = ["DEFAULT_CALIBRATION", "load_calibration"]
