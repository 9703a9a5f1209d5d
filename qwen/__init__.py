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

# The composition root: the extensions the core calls through qwen/transforms.py, as "module:attribute"
# (imported on first use, so `import qwen` stays light). Order matters only within a hook.
from . import transforms as _transforms  # noqa: E402

for _spec in ("qwen.finetune.lora:LORA_ADAPTER_TRANSFORM",  # adapter directories load their base
              "qwen.quant.bnb:BNB_TRANSFORM",               # load_in_4bit / load_in_8bit
              "qwen.quant.loading:GPTQ_TRANSFORM",          # GPTQ layers, tensors, kernels, save layout
              "qwen.quant.head:INT8_HEAD_TRANSFORM",         # int8_lm_head=True
              "qwen.cpu_pack:CPU_PACK_TRANSFORM"):           # cpu_packed_weights
    _transforms.register_load_transform(_spec)
_transforms.register_decode_step("qwen.kernels.decode:fused_decode_step")
_transforms.register_method("load_model", "qwen.checkpoint:load_model")
_transforms.register_method("save_model", "qwen.checkpoint:save_model")
_transforms.register_method("chat", "qwen.chat:chat")
_transforms.register_method("chat_stream", "qwen.chat:chat_stream")
_transforms.register_method("save_default_tokenizer", "qwen.tokenizer:save_default_tokenizer")


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qwen' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
