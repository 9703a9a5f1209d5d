"""Tiny models, synthetic examples and configs shared by the trainer tests (plain and DeepSpeed)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from qwen.config import preset_config
from qwen.data import Example
from qwen.finetune.trainer import TrainConfig
from qwen.model import QWenLMHeadModel


def tiny_model(seed: int = 0, **overrides) -> QWenLMHeadModel:
    cfg = preset_config("tiny-vocab", **overrides)
    torch.manual_seed(seed)
    model = QWenLMHeadModel(cfg)
    model.init_weights(seed)
    return model


def examples(n: int = 24, seed: int = 0, vocab: int = 500) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(6, 20, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        labels = [-100] * (length // 3) + ids[length // 3:]  # a masked prompt, a supervised reply
        out.append(Example(input_ids=ids, labels=labels, source=f"synthetic[{i}]"))
    return out


def config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path), max_steps=6, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=2,
                progress=False, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def free_port() -> int:
    """A port for torchrun's rendezvous (fixed ports clash between concurrent test runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
