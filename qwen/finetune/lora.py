"""LoRA adapters in the standard peft format: apply for training, save, load, merge.

Adapters use peft's own key names (``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight``,
``base_model.model.transformer.wte.weight`` for embeddings trained as ``modules_to_save``) and an
``adapter_config.json`` with ``task_type: CAUSAL_LM``, so adapters trained with the official
finetune.py load here and ours load on the official model with peft.

Notes on peft and our model (peft 0.21):
- ``get_peft_model(task_type="CAUSAL_LM")`` builds a PeftModelForCausalLM, which requires
  ``prepare_inputs_for_generation`` on the model and calls it with ``return_dict=None``; our model
  generates through qwen.generate instead. We wrap with the base ``PeftModel`` (its forward passes
  arguments through unchanged) while still recording ``task_type: CAUSAL_LM`` in the config.
  ``make_peft_compatible`` gives a model instance the missing hook, so peft's own
  ``PeftModel.from_pretrained(model, adapter_dir)`` also works on our model.
- Base (non-chat) models also train ``wte`` and ``lm_head`` (peft ``modules_to_save``) so the
  ChatML tokens get useful embeddings, as the official finetune.py did; we decide "base" from
  ``generation_config.chat_format``, not from the word "chat" in the path.
- Tied embeddings (config.tie_word_embeddings): both ``wte`` and ``lm_head`` are saved, and their
  trainable copies share one tensor while training, so the tie survives training and merging and the
  saved adapter still loads correctly with plain peft (which would otherwise untie them).

Q-LoRA: every function here also takes a quantized model (GPTQ QuantLinear or bitsandbytes layers);
the quantization-specific parts (peft registration of QuantLinear, the qlora_config.json record,
loading the quantized base) live in qwen/finetune/qlora.py. Adapters over GPTQ layers load unmerged
and merge only into the full-precision model, as the official README says.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..checkpoint import CONFIG_NAME, GENERATION_CONFIG_NAME, CheckpointError
from ..transforms import LoadTransform

if TYPE_CHECKING:  # pragma: no cover
    import peft

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_SAFE_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_BIN_WEIGHTS_NAME = "adapter_model.bin"
# Files copied from the base checkpoint so an adapter directory names its tokenizer and chat format.
_BASE_SIDE_FILES = ("qwen.tiktoken", "tokenizer_config.json", "special_tokens_map.json", "tokenization_qwen.py",
                    GENERATION_CONFIG_NAME)
_EMBEDDING_MODULES = ("wte", "lm_head")
# adapter_config.json keys that every peft since 0.7 understands (the official README pins peft<0.8,
# whose LoraConfig rejects unknown keys); newer keys are written only when they differ from the default.
_PORTABLE_CONFIG_KEYS = frozenset({
    "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "r",
    "target_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "modules_to_save",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
})


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; the defaults are the official finetune.py's LoraArguments."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("c_attn", "c_proj", "w1", "w2")
    bias: str = "none"
    # None: train wte and lm_head too when the checkpoint is a base model (chat_format != "chatml").
    train_embeddings: bool | None = None

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoRA bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str):
            self.target_modules = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module (e.g. c_attn, c_proj, w1, w2)")


# ---------------------------------------------------------------------------------------------- helpers
def _import_peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise ImportError(f"LoRA needs the peft package ({e}); install it with: pip install 'qwen[train]'") from None
    return peft


def _unwrap(model: Any) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_chat_model(model: Any) -> bool:
    """Whether ``model`` is a chat (ChatML) checkpoint: decides if LoRA also trains the embeddings.

    Read from generation_config.chat_format, falling back to a ``chat_format`` in config.json; a model
    with neither counts as chat (the GenerationConfig default), so nothing extra is trained."""
    model = _unwrap(model)
    gen = getattr(model, "generation_config", None)
    fmt = getattr(gen, "chat_format", None)
    if fmt is None:
        config = getattr(model, "config", None)
        fmt = getattr(config, "chat_format", None) or (getattr(config, "extra", None) or {}).get("chat_format")
    return (fmt or "chatml") == "chatml"


def make_peft_compatible(model: nn.Module) -> nn.Module:
    """Give the instance the ``prepare_inputs_for_generation`` hook that peft's PeftModelForCausalLM
    reads at construction (our model generates through qwen.generate and has none). Returns ``model``."""
    if not hasattr(model, "prepare_inputs_for_generation"):
        def prepare_inputs_for_generation(input_ids: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
            return {"input_ids": input_ids, **kwargs}

        model.prepare_inputs_for_generation = prepare_inputs_for_generation
    return model


def _refuse_packed(model: nn.Module) -> None:
    from ..cpu_pack import is_packed

    if is_packed(model):
        raise ValueError(
            "this model holds packed CPU weights (qwen.cpu_pack.PackedLinear), which peft cannot wrap; load it "
            "with load_model(..., cpu_packed_weights=False) or call qwen.cpu_pack.unpack_linear_layers(model) first"
        )


def _tie_saved_embeddings(peft_model: Any) -> None:
    """On a tied model, make the trainable lm_head copy share the trainable wte copy's tensor."""
    base = _unwrap(peft_model)
    if not getattr(base.config, "tie_word_embeddings", False):
        return
    wte, head = base.transformer.wte, base.lm_head
    if not (hasattr(wte, "modules_to_save") and hasattr(head, "modules_to_save")):
        return
    for name in wte.modules_to_save:
        if name in head.modules_to_save:
            head.modules_to_save[name].weight = wte.modules_to_save[name].weight


def trainable_parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------- training
def apply_lora(model: nn.Module, settings: LoraSettings | None = None, *, verbose: bool = True) -> "peft.PeftModel":
    """Wrap ``model`` with fresh LoRA adapters (B = 0, so outputs are unchanged) and freeze the rest.

    Returns a peft.PeftModel whose forward is the model's (``peft_model(input_ids=..., labels=...)``);
    prints the trainable parameter count like the official finetune.py unless ``verbose=False``."""
    peft = _import_peft()
    settings = settings or LoraSettings()
    if hasattr(model, "peft_config"):
        raise ValueError("this model already carries peft adapters; apply LoRA to the plain model")
    _refuse_packed(model)
    train_embeddings = settings.train_embeddings
    if train_embeddings is None:
        train_embeddings = not is_chat_model(model)
    config = peft.LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules), bias=settings.bias, task_type="CAUSAL_LM",
        modules_to_save=list(_EMBEDDING_MODULES) if train_embeddings else None,
    )
    config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    from .qlora import check_nothing_quantized_trains, describe, prepare_bnb_for_training, prepare_peft_config

    quantization = prepare_peft_config(model, config)  # None unless the base is quantized (Q-LoRA)
    if quantization is not None and quantization["quant_method"] == "bitsandbytes":
        prepare_bnb_for_training(model)
    make_peft_compatible(model)
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = peft.PeftModel(model, config)
    _tie_saved_embeddings(peft_model)
    if quantization is not None:
        check_nothing_quantized_trains(peft_model)
    trainable, total = trainable_parameter_counts(peft_model)
    if trainable == 0:
        raise ValueError(f"no module of the model matches the LoRA targets {list(settings.target_modules)}")
    if verbose:
        extra = " + wte, lm_head" if train_embeddings else ""
        kind = f"Q-LoRA over {describe(quantization)}," if quantization is not None else "LoRA"
        print(f"{kind} r={settings.r} alpha={settings.alpha} on {', '.join(settings.target_modules)}{extra}: "
              f"trainable params {trainable:,} || all params {total:,} || trainable% {100 * trainable / total:.4f}"
              + (" (quantized weights not counted)" if quantization is not None else ""))
    return peft_model


# ---------------------------------------------------------------------------------------------- saving
def _stage_next_to(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def _publish(stage: Path, out: Path, last: str) -> None:
    """Move staged files to ``out``: a rename of the whole directory when ``out`` does not exist, else
    file by file with ``last`` (the file that makes the directory usable) moved last."""
    if not out.exists():
        os.replace(stage, out)
        return
    if not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    for p in sorted(stage.iterdir(), key=lambda p: p.name == last):
        os.replace(p, out / p.name)
    shutil.rmtree(stage, ignore_errors=True)


def _copy_base_side_files(base: Path, stage: Path) -> None:
    for name in _BASE_SIDE_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, stage / name)
    if not (stage / "qwen.tiktoken").exists():  # a base without tokenizer files: write the bundled one
        from ..tokenizer import QWenTokenizer

        QWenTokenizer.from_pretrained(str(base)).save_pretrained(stage)


def _write_adapter_config(config: Any, file: Path) -> None:
    peft = _import_peft()
    data = config.to_dict()
    defaults = peft.LoraConfig().to_dict()
    data.pop("peft_version", None)
    for key in list(data):
        if key not in _PORTABLE_CONFIG_KEYS and key in defaults and data[key] == defaults[key]:
            del data[key]
    data = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in data.items()}
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_adapter(peft_model: Any, out_dir: str | os.PathLike, *, base_model_path: str | os.PathLike,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a standard peft adapter directory (adapter_config.json + adapter_model.safetensors) plus
    the base's tokenizer files and generation_config.json, so the directory describes itself. Over a
    quantized base (Q-LoRA), qlora_config.json records the quantization (see qwen/finetune/qlora.py).

    ``state_dict`` (keys as ``peft_model.state_dict()``) replaces the model's own tensors, e.g. the
    weights gathered from a DeepSpeed ZeRO-3 engine, whose module holds only this rank's shard.

    Written atomically: staged next to ``out_dir`` and renamed into place (file by file, config last,
    when ``out_dir`` already exists, e.g. a training output directory holding checkpoints)."""
    peft = _import_peft()
    from safetensors.torch import save_file

    from ..hub import resolve_model_path
    from .qlora import QLORA_CONFIG_NAME, quantization_of, write_qlora_config

    base = Path(resolve_model_path(base_model_path)).resolve()
    if not (base / CONFIG_NAME).is_file():
        raise CheckpointError(f"{base}: base_model_path must be the base checkpoint directory (no {CONFIG_NAME})")
    name = getattr(peft_model, "active_adapter", "default")
    config = copy.deepcopy(peft_model.peft_config[name])
    config.base_model_name_or_path = str(base)
    config.inference_mode = True
    config.task_type = "CAUSAL_LM"
    state = peft.get_peft_model_state_dict(peft_model, state_dict=state_dict, adapter_name=name,
                                           save_embedding_layers=False)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in state.items():
        t = t.detach().to("cpu").contiguous()
        if t.data_ptr() in seen:  # tied copies: safetensors refuses shared storage
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[key] = t

    out = Path(out_dir)
    stage = _stage_next_to(out)
    try:
        save_file(tensors, str(stage / ADAPTER_SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        _copy_base_side_files(base, stage)
        quantization = quantization_of(peft_model)
        if quantization is not None:
            write_qlora_config(quantization, stage)
        _write_adapter_config(config, stage / ADAPTER_CONFIG_NAME)
        _publish(stage, out, last=ADAPTER_CONFIG_NAME)
        for stale in ((ADAPTER_BIN_WEIGHTS_NAME,) + (() if quantization is not None else (QLORA_CONFIG_NAME,))):
            if (out / stale).exists():  # an older save's files: ambiguous next to the new ones
                (out / stale).unlink()
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------- loading
def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    file = adapter_dir / ADAPTER_CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{adapter_dir}: not a LoRA adapter directory (no {ADAPTER_CONFIG_NAME})")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    if data.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: peft_type {data.get('peft_type')!r} is not supported (LoRA adapters only)")
    return data


def resolve_base_model_path(adapter_dir: str | os.PathLike, base_model_path: str | os.PathLike | None = None) -> str:
    """The base checkpoint of an adapter: ``base_model_path`` if given, else the adapter config's
    ``base_model_name_or_path`` (absolute, or relative to the adapter directory or the working directory)."""
    from ..hub import resolve_model_path

    adapter = Path(adapter_dir)
    if base_model_path is not None:
        path = resolve_model_path(base_model_path)
        if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise CheckpointError(f"base model {os.fspath(base_model_path)!r} is not a checkpoint directory "
                                  f"(no {CONFIG_NAME})")
        return path
    recorded = _read_adapter_config(adapter).get("base_model_name_or_path")
    if not recorded:
        raise CheckpointError(f"{adapter / ADAPTER_CONFIG_NAME} does not name its base model "
                              "(base_model_name_or_path); pass base_model_path= (CLI: --base)")
    recorded = os.path.expanduser(str(recorded))
    candidates = [recorded] if os.path.isabs(recorded) else [str(adapter / recorded), recorded]
    for c in candidates:
        if os.path.isfile(os.path.join(c, CONFIG_NAME)):
            return c
    if recorded == "qwen-demo":
        return resolve_model_path(recorded)
    raise CheckpointError(
        f"{adapter}: the base model {recorded!r} named in {ADAPTER_CONFIG_NAME} was not found "
        f"(tried {', '.join(repr(c) for c in dict.fromkeys(candidates))}); pass the base checkpoint directory "
        "with base_model_path= (CLI: --base)"
    )


def _read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    safe, binf = adapter_dir / ADAPTER_SAFE_WEIGHTS_NAME, adapter_dir / ADAPTER_BIN_WEIGHTS_NAME
    try:
        if safe.is_file():
            from safetensors.torch import load_file

            return load_file(str(safe), device="cpu")
        if binf.is_file():
            return torch.load(str(binf), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise many types
        raise CheckpointError(f"{adapter_dir}: cannot read adapter weights ({type(e).__name__}: {e})") from None
    raise CheckpointError(f"{adapter_dir}: no adapter weights "
                          f"({ADAPTER_SAFE_WEIGHTS_NAME} or {ADAPTER_BIN_WEIGHTS_NAME})")


def _drop_unsaved_modules_to_save(config: Any, state: dict[str, torch.Tensor], adapter: Path) -> None:
    """The official finetune.py saves only lora_* tensors, although base-model runs also train wte and
    lm_head (modules_to_save); peft then fails with a KeyError. Such adapters load with the base's
    embeddings (what the official model got too), with a warning."""
    if not config.modules_to_save:
        return
    names = [k.removeprefix("base_model.model.") for k in state if "lora_" not in k]
    kept, dropped = [], []
    for m in config.modules_to_save:
        pattern = re.compile(rf"(^|\.){re.escape(m)}\.[^.]+$")
        (kept if any(pattern.search(n) for n in names) else dropped).append(m)
    if dropped:
        logger.warning("%s: adapter_config.json lists modules_to_save %s but the adapter weights do not hold "
                       "them (the official finetune.py saved only LoRA tensors); they keep the base model's values",
                       adapter, dropped)
        config.modules_to_save = kept or None


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, *, merge: bool = True,
                 trainable: bool = False) -> Any:
    """Apply the adapter in ``adapter_dir`` to ``model`` (its base, unpacked).

    ``merge=True`` folds the adapter into the weights and returns a plain QWenLMHeadModel (no
    inference overhead); ``merge=False`` returns the peft.PeftModel (frozen unless ``trainable``).
    A GPTQ-quantized ``model`` takes the adapter unmerged only (int4/int8 codes cannot absorb it)."""
    peft = _import_peft()
    from .qlora import MERGE_INTO_QUANTIZED, prepare_bnb_for_training, prepare_peft_config

    adapter = Path(adapter_dir)
    _read_adapter_config(adapter)
    _refuse_packed(model)
    if hasattr(model, "peft_config"):
        raise ValueError("this model already carries peft adapters; load the adapter into the plain base model")
    config = peft.LoraConfig.from_pretrained(str(adapter))
    config.inference_mode = not trainable
    state = _read_adapter_weights(adapter)
    _drop_unsaved_modules_to_save(config, state, adapter)
    quantization = prepare_peft_config(model, config)
    if merge and quantization is not None and quantization["quant_method"] == "gptq":
        raise ValueError(f"{adapter}: {MERGE_INTO_QUANTIZED} (load_adapter(..., merge=False))")
    if trainable and quantization is not None and quantization["quant_method"] == "bitsandbytes":
        prepare_bnb_for_training(model)
    make_peft_compatible(model)
    was_training = model.training
    peft_model = peft.PeftModel(model, config)
    _tie_saved_embeddings(peft_model)
    try:
        result = peft.set_peft_model_state_dict(peft_model, state)
    except RuntimeError as e:  # shape mismatches: adapter trained for another architecture
        raise CheckpointError(f"{adapter}: adapter does not fit this model ({e})") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise CheckpointError(
            f"{adapter}: adapter weights do not match the model: unexpected {list(result.unexpected_keys)[:6]}, "
            f"missing {missing[:6]}"
        )
    _tie_saved_embeddings(peft_model)
    if not merge:
        peft_model.train(was_training)
        return peft_model
    merged = peft_model.merge_and_unload()
    merged.train(was_training)
    for p in merged.parameters():  # peft froze the base; give back a model like load_model's
        p.requires_grad_(True)
    return merged


def load_adapter_checkpoint(adapter_dir: str | os.PathLike, *, base_model_path: str | os.PathLike | None = None,
                            cpu_packed_weights: bool | None = None, bnb: Any = None, **load_kwargs: Any) -> nn.Module:
    """``load_model(adapter_dir)``: load the base (unpacked), merge the adapter, then pack CPU fp32
    weights as load_model would have, so the result is an ordinary fast model.

    Q-LoRA adapters (the base is a GPTQ checkpoint, or qlora_config.json records a bitsandbytes
    quantization, or ``bnb`` BnbSettings are given) load on the quantized base, unmerged: the result is
    the QWenLMHeadModel with peft LoRA layers around its quantized linears (``cpu_packed_weights`` does
    not apply)."""
    from ..checkpoint import _load_generation_config, load_model
    from ..cpu_pack import pack_linear_layers, packing_supported
    from .qlora import bnb_settings, is_gptq_checkpoint, load_quantized_base, read_qlora_config

    adapter = Path(adapter_dir)
    base = resolve_base_model_path(adapter, base_model_path)
    record = read_qlora_config(adapter)
    if bnb is None and record is not None and record.get("quant_method") == "bitsandbytes":
        bnb = bnb_settings(record)
    if bnb is not None or is_gptq_checkpoint(base):
        model = load_quantized_base(base, quantize=bnb, **load_kwargs)
        model = load_adapter(model, adapter, merge=False).get_base_model()
        model.eval()
        model.name_or_path = str(adapter_dir)
        if (adapter / GENERATION_CONFIG_NAME).is_file():
            model.generation_config = _load_generation_config(str(adapter))
        return model
    model = load_model(base, cpu_packed_weights=False, **load_kwargs)
    model = load_adapter(model, adapter, merge=True)
    model.eval()
    if cpu_packed_weights is None:
        cpu_packed_weights = (all(p.device.type == "cpu" for p in model.parameters())
                              and packing_supported(model.dtype))
    if cpu_packed_weights:
        pack_linear_layers(model)
        model.requires_grad_(False)  # as load_model: packed models are for inference
    model.name_or_path = str(adapter_dir)
    if (adapter / GENERATION_CONFIG_NAME).is_file():
        model.generation_config = _load_generation_config(str(adapter))
    return model


def check_merge_base(base: str | os.PathLike, *, explicit: bool) -> None:
    """Refuse to merge into a GPTQ checkpoint (a Q-LoRA adapter's recorded base): name the fix."""
    from .qlora import is_gptq_checkpoint

    if not is_gptq_checkpoint(base):
        return
    where = "--base" if explicit else "the adapter's base (base_model_name_or_path)"
    raise CheckpointError(
        f"{where} {os.fspath(base)} is a GPTQ-quantized checkpoint: a LoRA adapter cannot be merged into "
        "int4/int8 weights. Pass the full-precision checkpoint it was quantized from, e.g. "
        "`qwen merge ADAPTER --base /models/Qwen-7B-Chat --output OUT` (Python: base_model_path=); the merged "
        "model can then be quantized again with `qwen quantize`"
    )


def merge_adapter(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, *, dtype: Any = None,
                  base_model_path: str | os.PathLike | None = None, device: Any = "cpu") -> Path:
    """Base + adapter -> a merged checkpoint in the official layout (tokenizer files included).

    The merge runs in fp32 on ``device``; the result is stored in ``dtype`` (default: the base
    checkpoint's dtype). A new ``output_dir`` appears whole or not at all."""
    from ..checkpoint import _load_generation_config, load_model, resolve_dtype, save_model
    from ..config import QWenConfig
    from ..tokenizer import QWenTokenizer

    adapter = Path(adapter_dir)
    _read_adapter_config(adapter)
    base = resolve_base_model_path(adapter, base_model_path)
    check_merge_base(base, explicit=base_model_path is not None)
    out = Path(output_dir)
    for other, what in ((adapter, "adapter"), (Path(base), "base model")):
        if out.exists() and out.resolve() == other.resolve():
            raise ValueError(f"--output {out} is the {what} directory; choose a new directory")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    save_dtype = resolve_dtype(QWenConfig.from_pretrained(base), torch.device("cpu"),
                               torch_dtype="auto" if dtype is None else dtype)
    model = load_model(base, device=device, torch_dtype=torch.float32, cpu_packed_weights=False, progress=False)
    model = load_adapter(model, adapter, merge=True)
    model.name_or_path = str(base)  # save_model copies the base's remote-code files
    if (adapter / GENERATION_CONFIG_NAME).is_file():
        model.generation_config = _load_generation_config(str(adapter))
    tokenizer = QWenTokenizer.from_pretrained(str(adapter if (adapter / "qwen.tiktoken").is_file() else base))
    if out.exists():  # save_model stages its files and renames them into the existing directory
        save_model(model, out, tokenizer=tokenizer, dtype=save_dtype)
        return out
    stage = _stage_next_to(out)
    try:
        save_model(model, stage, tokenizer=tokenizer, dtype=save_dtype)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


__all__ = ["LoraSettings", "apply_lora", "save_adapter", "load_adapter", "load_adapter_checkpoint", "merge_adapter",
           "check_merge_base", "is_chat_model", "make_peft_compatible", "resolve_base_model_path",
           "trainable_parameter_counts"]


class LoraAdapterTransform(LoadTransform):
    """``load_model(adapter_dir)`` for a directory holding adapter_config.json and no config.json
    (registered in qwen/__init__.py): load the base and merge (or wrap, for Q-LoRA) the adapter."""

    name = "lora-adapter"

    def load_instead(self, path: str, kwargs: dict[str, Any]) -> nn.Module | None:
        if os.path.exists(os.path.join(path, CONFIG_NAME)) or not os.path.exists(os.path.join(path, "adapter_config.json")):
            return None
        from ..quant.bnb import pop_bnb_settings

        # load_in_4bit/8bit on a Q-LoRA adapter: its base is quantized that way, the adapter applied unmerged.
        bnb = pop_bnb_settings(kwargs)
        return load_adapter_checkpoint(path, **kwargs) if bnb is None else load_adapter_checkpoint(path, bnb=bnb, **kwargs)


LORA_ADAPTER_TRANSFORM = LoraAdapterTransform()
