"""Model configuration: the fields of an official Qwen (v1) ``config.json``.

`QWenConfig` mirrors the official `configuration_qwen.py` key for key, so a
checkpoint's config.json round-trips unchanged (unknown keys are kept in
``extra`` and written back). Runtime limits (batch size, cache length,
sampling) do not belong here; they live in the cache and GenerationConfig.

Presets reproduce the released architectures (spec §1.2) plus tiny shapes for
tests. Sources: the Qwen/Qwen-{1_8B,7B,14B,72B} config.json files on the HF hub.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"


class ConfigError(ValueError):
    """A config.json that cannot describe a Qwen model (names the file and field)."""


@dataclass
class QWenConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_range: float = 0.02
    max_position_embeddings: int = 8192
    scale_attn_weights: bool = True
    use_cache: bool = True
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    kv_channels: int = 128
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    use_flash_attn: Any = "auto"
    intermediate_size: int = 22016  # twice the real MLP width (spec §2.3)
    no_bias: bool = True
    tie_word_embeddings: bool = False
    use_cache_quantization: bool = False
    use_cache_kernel: bool = False
    # Not an official field: how use_cache_quantization quantizes (docs/quantization.md). "round"
    # (default) is the accurate one; "official" reproduces the official quantizer bit for bit.
    # Written to config.json only when it is not the default.
    cache_quantization_mode: str = "round"
    softmax_in_fp32: bool = False
    # Not official fields: window attention (docs/long-context.md), never released upstream (spec §4.6).
    # With use_window_attn, the lowest ``window_layers`` layers (default: half of them) attend to the
    # last ``window_size`` tokens only (default: seq_length), the query itself included;
    # ``window_sizes`` (one entry per layer, None or 0 = full attention) overrides both. Written to
    # config.json only when not the defaults, so official configs stay unchanged.
    use_window_attn: bool = False
    window_size: int | None = None
    window_layers: int | None = None
    window_sizes: list[int | None] | None = None
    # Not a constructor argument upstream, but every released config.json has it and the
    # model reads it (NTK trigger, LogN). A config without it is rejected in from_dict.
    seq_length: int = 8192
    architectures: list[str] = field(default_factory=lambda: ["QWenLMHeadModel"])
    model_type: str = "qwen"
    torch_dtype: str | None = None
    quantization_config: dict[str, Any] | None = None
    # Keys we do not interpret (auto_map, onnx_safe, transformers_version, ...), kept for save.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            # The official code silently assumes projection_size == hidden_size (spec §1.3).
            raise ConfigError(
                f"kv_channels ({self.kv_channels}) x num_attention_heads ({self.num_attention_heads}) must equal "
                f"hidden_size ({self.hidden_size})"
            )
        if self.intermediate_size % 2:
            raise ConfigError(f"intermediate_size {self.intermediate_size} must be even (the MLP width is half of it)")
        if not 0 < self.rotary_pct <= 1:
            raise ConfigError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if sum(bool(x) for x in (self.bf16, self.fp16, self.fp32)) > 1:
            raise ConfigError("at most one of bf16, fp16 and fp32 may be true")
        if self.seq_length <= 0:
            raise ConfigError(f"seq_length must be positive, got {self.seq_length}")
        if self.cache_quantization_mode not in ("official", "round"):
            raise ConfigError(
                f"cache_quantization_mode must be 'official' or 'round', got {self.cache_quantization_mode!r}"
            )
        self._check_window_fields()

    def _check_window_fields(self) -> None:
        def positive_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        if not isinstance(self.use_window_attn, bool):
            raise ConfigError(f"use_window_attn must be true or false, got {self.use_window_attn!r}")
        if self.window_size is not None and not positive_int(self.window_size):
            raise ConfigError(f"window_size must be a positive number of tokens (or null for seq_length), "
                              f"got {self.window_size!r}")
        if self.window_layers is not None and not (
                isinstance(self.window_layers, int) and not isinstance(self.window_layers, bool)
                and 0 <= self.window_layers <= self.num_hidden_layers):
            raise ConfigError(f"window_layers must be a layer count in 0..{self.num_hidden_layers} "
                              f"(num_hidden_layers), or null for half of them; got {self.window_layers!r}")
        if self.window_sizes is not None:
            sizes = self.window_sizes
            if not isinstance(sizes, (list, tuple)) or len(sizes) != self.num_hidden_layers:
                raise ConfigError(f"window_sizes must be a list of {self.num_hidden_layers} entries (one per layer, "
                                  f"null or 0 for full attention), got {sizes!r}")
            for i, w in enumerate(sizes):
                if w is not None and w != 0 and not positive_int(w):
                    raise ConfigError(f"window_sizes[{i}] must be a positive number of tokens, or null / 0 for full "
                                      f"attention; got {w!r}")
            self.window_sizes = list(sizes)

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return self.kv_channels if self.rotary_pct == 1.0 else int(self.kv_channels * self.rotary_pct)

    @property
    def ffn_hidden_size(self) -> int:
        return self.intermediate_size // 2

    @property
    def layer_windows(self) -> list[int | None]:
        """Per layer, the window of window attention (None: full attention); all None unless use_window_attn.

        Key j is visible to query i iff i - window < j <= i (token indices in the sequence, so the
        window counts the query itself)."""
        n = self.num_hidden_layers
        if not self.use_window_attn:
            return [None] * n
        if self.window_sizes is not None:
            return [int(w) if w else None for w in self.window_sizes]
        size = self.window_size if self.window_size is not None else self.seq_length
        lower = self.window_layers if self.window_layers is not None else n // 2
        return [size if i < lower else None for i in range(n)]

    def num_parameters(self) -> int:
        """Parameter count implied by the shapes (spec §2.2)."""
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        per_layer = 2 * h + (3 * h * h + 3 * h) + h * h + 3 * h * f
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_hidden_layers * per_layer + h + head

    # ------------------------------------------------------------------ io
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "QWenConfig":
        d = dict(d)
        model_type = d.get("model_type", "qwen")
        if model_type != "qwen":
            raise ConfigError(f"{source}: model_type is {model_type!r}; this package runs first-generation Qwen ('qwen')")
        if "seq_length" not in d:
            raise ConfigError(
                f"{source}: missing field 'seq_length' (every official Qwen config.json has it; it sets the "
                "training context used by dynamic NTK and LogN, e.g. 8192 for Qwen-7B, 2048 for Qwen-14B)"
            )
        # Early (Aug 2023) configs used other names for two fields.
        aliases = {"padded_vocab_size": "vocab_size", "ffn_hidden_size": None}
        for old, new in aliases.items():
            if old in d:
                value = d.pop(old)
                if new is None:
                    d.setdefault("intermediate_size", 2 * int(value))
                else:
                    d.setdefault(new, value)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        ignored = set(extra) - {"auto_map", "onnx_safe", "transformers_version", "tokenizer_class", "_name_or_path"}
        if ignored:
            logger.info("%s: keeping unused keys %s", source, sorted(ignored))
        try:
            return cls(**known, extra=extra)
        except TypeError as e:  # wrong value types surface here
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "QWenConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "QWenConfig":
        from .hub import resolve_model_path

        path = resolve_model_path(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else str(path)
        if not os.path.exists(file):
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME} found")
        config = cls.from_json_file(file)
        return config.update(**overrides) if overrides else config

    def update(self, **overrides: Any) -> "QWenConfig":
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise ConfigError(f"unknown config fields: {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if d["quantization_config"] is None:
            del d["quantization_config"]
        if d["torch_dtype"] is None:
            del d["torch_dtype"]
        if d["cache_quantization_mode"] == "round":  # ours, not official: keep official configs unchanged
            del d["cache_quantization_mode"]
        for name, default in (("use_window_attn", False), ("window_size", None), ("window_layers", None),
                              ("window_sizes", None)):  # ours too
            if d[name] == default:
                del d[name]
        d.update(self.extra)
        return d

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def ntk_alpha(length: int, seq_length: int) -> int:
    """Dynamic-NTK alpha for a context of ``length`` tokens (spec §4.4).

    alpha = max(1, 2**ceil(log2(length / seq_length) + 1) - 1): 1 up to seq_length, 3 up to 2x,
    7 up to 4x, 15 up to 8x.
    """
    if length <= 0:
        return 1
    context_value = math.log(length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def ntk_base(base: float, alpha: float, rotary_dim: int) -> float:
    """RoPE base stretched by NTK alpha: base * alpha ** (d / (d - 2)) (spec §4.4)."""
    return base * alpha ** (rotary_dim / (rotary_dim - 2))


def logn_factor(position: int, seq_length: int) -> float:
    """LogN query scale for absolute 0-based ``position`` (spec §4.5): log(p+1)/log(S) beyond S, else 1."""
    return math.log(position + 1) / math.log(seq_length) if position + 1 > seq_length else 1.0


def _preset(**kw: Any) -> dict[str, Any]:
    return kw


# Architecture presets (spec §1.2). seq_length is the training context.
PRESETS: dict[str, dict[str, Any]] = {
    # https://huggingface.co/Qwen/Qwen-1_8B/blob/main/config.json
    "qwen-1.8b": _preset(hidden_size=2048, intermediate_size=11008, num_hidden_layers=24, num_attention_heads=16,
                         kv_channels=128, vocab_size=151936, seq_length=8192, max_position_embeddings=32768),
    # https://huggingface.co/Qwen/Qwen-7B/blob/main/config.json
    "qwen-7b": _preset(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
                       kv_channels=128, vocab_size=151936, seq_length=8192, max_position_embeddings=32768),
    # https://huggingface.co/Qwen/Qwen-14B/blob/main/config.json
    "qwen-14b": _preset(hidden_size=5120, intermediate_size=27392, num_hidden_layers=40, num_attention_heads=40,
                        kv_channels=128, vocab_size=152064, seq_length=2048, max_position_embeddings=8192),
    # https://huggingface.co/Qwen/Qwen-72B/blob/main/config.json
    "qwen-72b": _preset(hidden_size=8192, intermediate_size=49152, num_hidden_layers=80, num_attention_heads=64,
                        kv_channels=128, vocab_size=152064, seq_length=32768, max_position_embeddings=32768,
                        rotary_emb_base=1000000, use_dynamic_ntk=False, use_logn_attn=False),
    # ~300M-parameter shape used by benchmarks (hidden 1024, 12 layers); full Qwen vocabulary.
    "qwen-300m": _preset(hidden_size=1024, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=8,
                         kv_channels=128, vocab_size=151936, seq_length=8192, max_position_embeddings=32768),
    # Test shapes: the real tokenizer's ids fit (vocab 151936) but the body is tiny.
    "tiny": _preset(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    kv_channels=16, vocab_size=151936, seq_length=64, max_position_embeddings=256),
    # Tiny with a small vocabulary: for tests that never touch the real tokenizer.
    "tiny-vocab": _preset(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          kv_channels=16, vocab_size=512, seq_length=64, max_position_embeddings=256),
}


def preset_config(name: str, **overrides: Any) -> QWenConfig:
    """A config for a named preset (``qwen-7b``, ``qwen-14b``, ``qwen-1.8b``, ``tiny``, ...)."""
    key = name.lower().removesuffix("-shaped")
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return QWenConfig.from_dict({**PRESETS[key], **overrides}, source=f"preset {name}")
