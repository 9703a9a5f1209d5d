"""Calibration sequences for GPTQ, read like the official run_gptq.py reads them.

run_gptq.py takes the fine-tuning data format (a JSON list of ``{"conversations": [...]}``),
renders each sample with finetune.py's ChatML preprocessing, truncates it to ``max_len`` and keeps
only the input ids. We reuse the fine-tuning reader (qwen/finetune/data.py), so every format
``qwen train`` accepts works here too: the official SFT JSON (rendered with the official
preprocessing), JSONL chats or ``{"text": ...}`` documents, and plain text (documents concatenated
with <|endoftext|> and cut into ``max_len``-token blocks).
"""

from __future__ import annotations

import os
from typing import Any

import torch


def load_calibration(path: str | os.PathLike[str], tokenizer: Any, max_len: int = 2048,
                     num_samples: int | None = 128) -> list[torch.Tensor]:
    """Up to ``num_samples`` id sequences (1-D int64 tensors, at most ``max_len`` tokens), in file order."""
    from ..finetune.data import read_records, tokenize_records

    records = read_records(path)
    data = tokenize_records(tokenizer, records, max_len=max_len, label_mask="official")
    rows = [ex.input_ids for ex in data.examples if len(ex.input_ids) >= 2]
    if num_samples is not None:
        rows = rows[:num_samples]
    return [torch.tensor(ids, dtype=torch.long) for ids in rows]


__all__ = ["load_calibration"]
