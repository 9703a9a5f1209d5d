"""GenerationConfig: the generation_config.json of a checkpoint, with HF field names and semantics.

Also the released models' files as presets (spec §8.6), and the typing aliases for HF-style logits
processors and stopping criteria shared by the generation layers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .sampling import SamplingParams

logger = logging.getLogger(__name__)

GENERATION_CONFIG_NAME = "generation_config.json"

# An HF-style logits processor: (input_ids [B, L], scores [B, V]) -> scores.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# An HF-style stopping criterion: (input_ids [B, L], scores [B, V] | None) -> bool [B] (or one bool).
StoppingCriterion = Callable[[torch.Tensor, torch.Tensor | None], Any]

# generation_config.json of the released models (spec §8.6).
# Qwen-7B-Chat / 7B-Chat-Int4, final version (after 2023-11-30).
QWEN_7B_CHAT: dict[str, Any] = {
    "chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 24000,
    "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1,
    "transformers_version": "4.31.0",
}
# Qwen-14B-Chat after the Oct-2023 hyper-parameter update (spec §13: inferred from the 7B commits).
QWEN_14B_CHAT: dict[str, Any] = {
    "chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
    "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1,
}
# Qwen-7B base (the 14B base file is presumably the same).
QWEN_7B_BASE: dict[str, Any] = {
    "chat_format": "raw", "eos_token_id": 151643, "pad_token_id": 151643, "stop_words_ids": [[151643]],
    "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8,
}
PRESETS: dict[str, dict[str, Any]] = {
    "qwen-7b-chat": QWEN_7B_CHAT,
    "qwen-14b-chat": QWEN_14B_CHAT,
    "qwen-7b": QWEN_7B_BASE,
    "qwen-14b": QWEN_7B_BASE,
}


# ----------------------------------------------------------------------------------------------- config
@dataclass
class GenerationConfig:
    """Decoding settings, with the field names of HF's GenerationConfig and Qwen's generation_config.json.

    Keys we do not interpret (transformers_version, num_beams, ...) are kept in ``extra`` and
    written back on save. top_k 0 and top_p 1.0 switch those filters off.
    """

    max_new_tokens: int | None = 512
    max_length: int | None = None  # prompt + new; only used when max_new_tokens is None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # HF's default is 50, but every Qwen config sets 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI semantics, over generated ids (not an HF field)
    frequency_penalty: float = 0.0
    eos_token_id: int | list[int] | None = 151643
    pad_token_id: int | None = None  # None: pad finished rows with eos
    stop_words_ids: list[list[int]] | None = None
    stop_strings: list[str] | None = None
    chat_format: str = "chatml"
    max_window_size: int = 6144
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.sampling_params()  # range checks live in SamplingParams
        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
        if self.stop_words_ids is not None and not (
            isinstance(self.stop_words_ids, (list, tuple))
            and all(isinstance(s, (list, tuple)) and all(isinstance(i, int) and i >= 0 for i in s)
                    for s in self.stop_words_ids)
        ):
            raise ValueError(
                f"stop_words_ids must be a list of lists of non-negative ints, got {self.stop_words_ids!r}"
            )

    def sampling_params(self) -> SamplingParams:
        # None (as some HF configs write) means "off" for every field.
        return SamplingParams(
            do_sample=bool(self.do_sample),
            temperature=float(1.0 if self.temperature is None else self.temperature),
            top_k=int(self.top_k or 0),
            top_p=float(1.0 if self.top_p is None else self.top_p),
            min_p=self.min_p,
            repetition_penalty=float(self.repetition_penalty or 1.0),
            presence_penalty=float(self.presence_penalty or 0.0),
            frequency_penalty=float(self.frequency_penalty or 0.0),
        )

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerationConfig":
        names = cls.field_names()
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if isinstance(d.get("extra"), dict):  # a to_dict() that was not flattened
            extra.update(d["extra"])
            extra.pop("extra", None)
        return cls(**known, extra=extra)

    @classmethod
    def from_preset(cls, name: str) -> "GenerationConfig":
        """The generation_config.json of a released model: qwen-7b-chat, qwen-14b-chat, qwen-7b."""
        if name.lower() not in PRESETS:
            raise ValueError(f"unknown generation preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict(copy.deepcopy(PRESETS[name.lower()]))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "GenerationConfig":
        """Read generation_config.json from a checkpoint directory or the file itself.

        Keyword arguments override fields (``pad_token_id=...`` as in the official batch recipe);
        transformers loader arguments (trust_remote_code, revision, ...) are ignored.
        """
        from .hub import resolve_model_path

        for k in ("trust_remote_code", "revision", "cache_dir", "local_files_only", "token", "force_download"):
            kwargs.pop(k, None)
        if str(path) == "qwen-demo":
            path = resolve_model_path(path)
        config = cls._read(path)
        if kwargs:
            unknown = config.update(**kwargs)
            if unknown:
                raise TypeError(f"GenerationConfig.from_pretrained got unknown fields {sorted(unknown)}")
        return config

    @classmethod
    def _read(cls, path: str | os.PathLike) -> "GenerationConfig":
        is_file = os.path.isfile(path) or str(path).endswith(".json")
        file = str(path) if is_file else os.path.join(path, GENERATION_CONFIG_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no generation config: {file} does not exist")
        with open(file, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{file}: expected a JSON object")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready dict; unset (None) fields and zero OpenAI penalties are left out."""
        d = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None:
                continue
            if f.name in ("presence_penalty", "frequency_penalty") and value == 0.0:
                continue
            d[f.name] = copy.deepcopy(value)
        d.update(copy.deepcopy(self.extra))
        return d

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write <dir>/generation_config.json atomically (temp file + os.replace); returns the path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, GENERATION_CONFIG_NAME)
        fd, tmp = tempfile.mkstemp(dir=save_directory, prefix=".generation_config.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json_string())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the known fields (validated); return the unknown keys untouched, like HF."""
        names = self.field_names()
        known = {k: v for k, v in kwargs.items() if k in names}
        old = {k: getattr(self, k) for k in known}
        for k, v in known.items():
            setattr(self, k, v)
        try:
            self.validate()
        except Exception:
            for k, v in old.items():
                setattr(self, k, v)
            raise
        return {k: v for k, v in kwargs.items() if k not in names}

    def copy(self) -> "GenerationConfig":
        return copy.deepcopy(self)

    @property
    def eos_token_ids(self) -> list[int]:
        return _id_list(self.eos_token_id)


def _id_list(ids: int | Sequence[int] | torch.Tensor | None) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        return [int(i) for i in ids.reshape(-1).tolist()]
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def _as_generation_config(cfg: Any) -> GenerationConfig:
    if isinstance(cfg, GenerationConfig):
        return cfg
    if isinstance(cfg, dict):
        return GenerationConfig.from_dict(cfg)
    if hasattr(cfg, "to_dict"):  # e.g. a transformers.GenerationConfig
        return GenerationConfig.from_dict(cfg.to_dict())
    raise TypeError(f"generation_config must be a GenerationConfig or a dict, got {type(cfg).__name__}")


def resolve_generation_config(
    model: Any, generation_config: Any = None, **overrides: Any
) -> tuple[GenerationConfig, dict[str, Any]]:
    """A private copy of (generation_config or model.generation_config or defaults) with the non-None
    overrides applied; returns it and the override keys that are not config fields."""
    base = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    cfg = _as_generation_config(base).copy() if base is not None else GenerationConfig()
    unknown = cfg.update(**{k: v for k, v in overrides.items() if v is not None})
    return cfg, unknown
