"""transformers-style entry points, so the official snippets run with only the import line changed.

    from qwen import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-7B-Chat", trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen-7B-Chat", device_map="auto", trust_remote_code=True).eval()
"""

from __future__ import annotations

import os
from typing import Any

from .config import QWenConfig


class AutoConfig:
    @staticmethod
    def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> QWenConfig:
        for k in ("trust_remote_code", "revision", "cache_dir", "local_files_only"):
            kwargs.pop(k, None)
        return QWenConfig.from_pretrained(path, **kwargs)


class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """checkpoint.load_model: GPTQ, bitsandbytes (load_in_4bit/8bit), LoRA adapter directories and the CPU
        options are its registered load transforms (qwen/transforms.py)."""
        from .checkpoint import load_model

        return load_model(path, *args, **kwargs)

    @staticmethod
    def from_config(config: QWenConfig, **kwargs: Any) -> Any:
        from .model import QWenLMHeadModel

        model = QWenLMHeadModel(config)
        model.init_weights(seed=kwargs.get("seed"))
        return model


class AutoTokenizer:
    @staticmethod
    def from_pretrained(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        from .tokenizer import QWenTokenizer

        return QWenTokenizer.from_pretrained(path, *args, **kwargs)
