"""A stand-in model that follows a script: the i-th generated token is script[i] (one-hot logits).

It has QWenLMHeadModel's call signature and cache protocol, so text-level behaviour (stop strings,
UTF-8 splits, streamer protocol, chat bookkeeping) can be tested deterministically.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn


class DummyCache:
    def __init__(self) -> None:
        self.length = 0
        self.ntk_alpha = None

    def reserve(self, extra: int) -> None:
        pass

    def crop(self, length: int) -> None:
        self.length = length


class Scripted(nn.Module):
    def __init__(self, script: list[int], vocab_size: int = 151936, generation_config: Any = None) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.anchor = nn.Parameter(torch.zeros(()))
        self.script = list(script)
        self.forward_calls = 0
        self.prompts: list[list[int]] = []
        self.generation_config = generation_config

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def new_cache(self, batch_size: int, capacity: int) -> DummyCache:
        return DummyCache()

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=True, logits_to_keep=0, **kw):  # type: ignore[no-untyped-def]
        cache = past_key_values if past_key_values is not None else DummyCache()
        if cache.length == 0:
            self.prompt_len = input_ids.shape[1]
            self.prompts.append(input_ids[0].tolist())
        cache.length += input_ids.shape[1]
        fed = cache.length - self.prompt_len  # generated tokens already fed back
        logits = torch.zeros(input_ids.shape[0], 1, self.config.vocab_size)
        logits[:, :, self.script[min(fed, len(self.script) - 1)]] = 10.0
        self.forward_calls += 1
        return SimpleNamespace(logits=logits, past_key_values=cache)
