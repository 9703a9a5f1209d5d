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
        from .checkpoint import load_model
        from .quant.bnb import pop_bnb_settings, quantize_with_bitsandbytes

        bnb = pop_bnb_settings(kwargs)  # load_in_4bit / load_in_8bit / BitsAndBytesConfig
        if bnb is None:
            return load_model(path, *args, **kwargs)
        if os.path.isfile(os.path.join(path, "qlora_config.json")):
            # A Q-LoRA adapter: quantize its base this way and apply the adapter unmerged.
            from .finetune.lora import load_adapter_checkpoint

            return load_adapter_checkpoint(path, bnb=bnb, **kwargs)
        kwargs["cpu_packed_weights"] = False  # bitsandbytes replaces plain nn.Linear layers
        return quantize_with_bitsandbytes(load_model(path, *args, **kwargs), bnb)

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
