"""qwen: first-generation Qwen models in plain PyTorch (load, tokenize, generate, chat).

Heavy submodules load on first use, so ``import qwen`` stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AutoConfig": "qwen.auto",
    "AutoModelForCausalLM": "qwen.auto",
    "AutoTokenizer": "qwen.auto",
    "QWenConfig": "qwen.config",
    "QWenLMHeadModel": "qwen.model",
    "KVCache": "qwen.cache",
    "QWenTokenizer": "qwen.tokenizer",
    "GenerationConfig": "qwen.generate",
    "TextStreamer": "qwen.generate",
    "TextIteratorStreamer": "qwen.generate",
    "ChatSession": "qwen.chat",
    "load_model": "qwen.checkpoint",
    "save_model": "qwen.checkpoint",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qwen' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
