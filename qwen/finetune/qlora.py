"""Q-LoRA: LoRA adapters trained over a frozen, quantized base (``qwen train --method qlora``).

Two kinds of quantized base:

- **GPTQ** (int4 / int8, the official ``Qwen-*-Chat-Int4`` layout, or ``qwen quantize`` output): the
  block linears are our :class:`qwen.quant.linear.QuantLinear`. peft does not know this layer type, so
  it is registered with ``LoraConfig._register_custom_module({QuantLinear: QuantLoraLinear})``;
  ``QuantLoraLinear`` adds ``lora_B(lora_A(dropout(x))) * scaling`` to the frozen quantized output,
  as peft's own wrapper for auto-gptq / gptqmodel layers does. QuantLinear's forward is differentiable
  with respect to its input (the backward dequantizes the weight a slice at a time), and its codes,
  scales and bias are buffers, so nothing of the base can train.
- **bitsandbytes** (NF4 / FP4 / int8, ``--quantize nf4|fp4|int8-bnb`` on a full-precision
  checkpoint): the checkpoint loads in float and its block linears become bitsandbytes layers
  (:mod:`qwen.quant.bnb`), which peft wraps natively.

The adapter is a standard peft adapter directory, as for LoRA (same tensor names: an adapter trained
by the official finetune.py with ``--q_lora`` loads here). Next to it, ``qlora_config.json`` records
how the base was quantized (for bitsandbytes this is the only record: ``base_model_name_or_path``
names the full-precision checkpoint it was quantized from at load time). Loading such an adapter
gives the quantized base with the adapter **unmerged** (an int4 weight cannot absorb a low-rank
update); merging goes into the full-precision model instead, as the official README says
(``qwen merge ADAPTER --base FP_DIR --output OUT``).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import CONFIG_NAME, CheckpointError
from ..quant.bnb import BnbSettings
from ..quant.linear import QuantLinear

QLORA_CONFIG_NAME = "qlora_config.json"
# --quantize choices: bitsandbytes quantization applied to a full-precision checkpoint at load time.
QUANTIZE_CHOICES = {
    "nf4": dict(bits=4, quant_type="nf4"),
    "fp4": dict(bits=4, quant_type="fp4"),
    "int8-bnb": dict(bits=8),
}
MERGE_INTO_QUANTIZED = (
    "a LoRA adapter cannot be merged into quantized weights (GPTQ int4/int8 codes cannot absorb a low-rank "
    "update); merge it into the full-precision model the quantized one was made from (qwen merge ADAPTER "
    "--base FP_DIR --output OUT), or load it unmerged on the quantized base"
)


# ---------------------------------------------------------------------------------------------- detection
def _bnb_layer_types() -> tuple[type, ...]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized_layer(module: nn.Module) -> bool:
    return isinstance(module, (QuantLinear, *_bnb_layer_types()))


def quantization_of(model: nn.Module) -> dict[str, Any] | None:
    """How ``model``'s (or a peft model's base's) linears are quantized, as recorded in qlora_config.json;
    None for a float model."""
    bnb_types = _bnb_layer_types()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            return {"quant_method": "gptq", "bits": module.bits, "group_size": module.group_size}
        if bnb_types and isinstance(module, bnb_types[0]):
            weight = module.weight
            return {"quant_method": "bitsandbytes", "bits": 4, "quant_type": getattr(weight, "quant_type", "nf4"),
                    "compute_dtype": str(module.compute_dtype or torch.float32).removeprefix("torch."),
                    "double_quant": bool(getattr(weight, "compress_statistics", False))}
        if bnb_types and isinstance(module, bnb_types[1]):
            return {"quant_method": "bitsandbytes", "bits": 8, "int8_threshold": float(module.state.threshold)}
    return None


def is_gptq_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the checkpoint directory's config.json declares GPTQ quantization."""
    file = Path(path) / CONFIG_NAME
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and str(qc.get("quant_method", "gptq")).lower() == "gptq"


def read_qlora_config(adapter_dir: str | os.PathLike) -> dict[str, Any] | None:
    file = Path(adapter_dir) / QLORA_CONFIG_NAME
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def write_qlora_config(record: dict[str, Any], directory: Path) -> None:
    (directory / QLORA_CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def bnb_settings(quantize: str | dict[str, Any], compute_dtype: torch.dtype = torch.float32) -> BnbSettings:
    """BnbSettings from a ``--quantize`` choice or a qlora_config.json record."""
    if isinstance(quantize, str):
        if quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
        return BnbSettings(compute_dtype=compute_dtype, **QUANTIZE_CHOICES[quantize])
    record = quantize
    if record.get("quant_method") != "bitsandbytes":
        raise ValueError(f"not a bitsandbytes quantization record: {record}")
    dtype = record.get("compute_dtype")
    return BnbSettings(bits=int(record.get("bits", 4)), quant_type=record.get("quant_type", "nf4"),
                       compute_dtype=getattr(torch, dtype) if dtype else compute_dtype,
                       double_quant=bool(record.get("double_quant", False)),
                       int8_threshold=float(record.get("int8_threshold", 6.0)))


# ---------------------------------------------------------------------------------------------- loading
def load_quantized_base(path: str | os.PathLike, *, quantize: str | BnbSettings | None = None,
                        device: Any = None, torch_dtype: Any = None, progress: bool = True,
                        **load_kwargs: Any) -> nn.Module:
    """The frozen quantized base for Q-LoRA: a GPTQ checkpoint as it is, or a full-precision checkpoint
    quantized by bitsandbytes (``quantize``: nf4, fp4, int8-bnb or BnbSettings)."""
    from ..checkpoint import load_model
    from ..hub import resolve_model_path
    from ..quant.bnb import quantize_with_bitsandbytes

    resolved = resolve_model_path(path)
    gptq = is_gptq_checkpoint(resolved)
    if gptq and quantize is not None:
        raise ValueError(f"{path} is already a GPTQ-quantized checkpoint; drop --quantize (it quantizes a "
                         "full-precision checkpoint with bitsandbytes)")
    if not gptq and quantize is None:
        raise ValueError(f"Q-LoRA needs a quantized base: {path} is a full-precision checkpoint. Pass a GPTQ "
                         "checkpoint (official -Int4/-Int8, or `qwen quantize` output) or add --quantize "
                         f"{'|'.join(QUANTIZE_CHOICES)} to quantize this one with bitsandbytes")
    model = load_model(resolved, device=device, torch_dtype=torch_dtype, cpu_packed_weights=False,
                       progress=progress, **load_kwargs)
    if not gptq:
        settings = quantize if isinstance(quantize, BnbSettings) else bnb_settings(quantize, model.dtype)
        model = quantize_with_bitsandbytes(model, settings)
    model.requires_grad_(False)
    model.name_or_path = str(path)
    return model


# ---------------------------------------------------------------------------------------------- peft glue
@functools.cache
def quant_lora_layer_class() -> type:
    """The peft LoRA layer for QuantLinear (built on first use: peft is an optional dependency)."""
    from peft.tuners.lora.layer import LoraLayer

    class QuantLoraLinear(nn.Module, LoraLayer):
        """LoRA over a frozen QuantLinear: y = quant(x) + lora_B(lora_A(dropout(x))) * scaling, never merged."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: int = 1,
                     **kwargs: Any) -> None:
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            if getattr(config, "use_dora", False):
                raise ValueError("DoRA is not supported on quantized (GPTQ) layers")
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features  # (peft's generic lookup warns on unknown types)

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_a, lora_b = self.lora_A[name], self.lora_B[name]
                xa = self._cast_input_dtype(x, lora_a.weight.dtype)
                delta = lora_b(lora_a(self.lora_dropout[name](xa))) * self.scaling[name]
                result = result + delta.to(result.dtype)
            return result

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            """The float update B A * scaling [out, in] (what a merge into the fp weight adds)."""
            return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            raise ValueError(MERGE_INTO_QUANTIZED)

        def unmerge(self) -> None:  # nothing is ever merged
            return None

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    QuantLoraLinear.__module__ = __name__
    QuantLoraLinear.__qualname__ = "QuantLoraLinear"
    return QuantLoraLinear


def __getattr__(name: str) -> Any:  # ``from qwen.finetune.qlora import QuantLoraLinear`` (needs peft)
    if name == "QuantLoraLinear":
        return quant_lora_layer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prepare_peft_config(model: nn.Module, config: Any) -> dict[str, Any] | None:
    """Make ``config`` (a peft LoraConfig about to wrap ``model``) Q-LoRA-ready; returns the model's
    quantization record (None for a float model, which is left alone).

    Registers QuantLoraLinear for GPTQ layers, marks bitsandbytes models the way peft's bitsandbytes
    dispatch expects, and refuses settings that would train (or silently fail to train) part of a
    quantized layer."""
    record = quantization_of(model)
    if record is None:
        return None
    if record["quant_method"] == "gptq":
        config._register_custom_module({QuantLinear: quant_lora_layer_class()})
        if config.bias != "none":
            raise ValueError(f"LoRA bias {config.bias!r} cannot train the bias of GPTQ layers (a frozen fp16 "
                             "buffer of the quantized checkpoint); use bias 'none'")
    else:  # peft wraps bitsandbytes layers with its own classes only when the model says it is k-bit
        setattr(model, "is_loaded_in_4bit" if record["bits"] == 4 else "is_loaded_in_8bit", True)
    for name in config.modules_to_save or ():
        for module_name, module in model.named_modules():
            if (module_name == name or module_name.endswith("." + name)) and any(
                    is_quantized_layer(m) for m in module.modules()):
                raise ValueError(f"{module_name} is quantized and cannot be trained (modules_to_save {name!r})")
    return record


def prepare_bnb_for_training(model: nn.Module) -> None:
    """Keep bitsandbytes 4-bit layers on their differentiable path.

    bitsandbytes 0.50 repacks a Linear4bit's weight into a CPU inference layout (on CPUs with AVX512-BF16)
    the first time it runs in eval mode on an input without grad, e.g. an eval pass. Its matmul in that
    layout has no backward: a later training forward fails ("a view of a leaf Variable that requires
    grad is being used in an in-place operation") or, without bias, gives no input gradient. So, for
    training: undo the repacking where it happened and switch it off."""
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return
    bnb_types = _bnb_layer_types()
    for module in model.modules():
        if not (bnb_types and isinstance(module, bnb_types[0])):
            continue
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
            module.quant_state = module.weight.quant_state
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def check_nothing_quantized_trains(peft_model: nn.Module) -> None:
    for name, module in peft_model.named_modules():
        if is_quantized_layer(module):
            trainable = [n for n, p in module.named_parameters() if p.requires_grad]
            if trainable:
                raise ValueError(f"{name}: quantized layer with trainable tensors {trainable}")


def describe(record: dict[str, Any]) -> str:
    if record["quant_method"] == "gptq":
        return f"GPTQ int{record['bits']} (group size {record['group_size']})"
    if record["bits"] == 4:
        return f"bitsandbytes {record['quant_type'].upper()} (compute {record['compute_dtype']})"
    return "bitsandbytes int8"


__all__ = ["QLORA_CONFIG_NAME", "QUANTIZE_CHOICES", "MERGE_INTO_QUANTIZED", "is_quantized_layer", "quantization_of",
           "is_gptq_checkpoint", "read_qlora_config", "write_qlora_config", "bnb_settings", "load_quantized_base",
           "quant_lora_layer_class", "prepare_peft_config", "prepare_bnb_for_training",
           "check_nothing_quantized_trains", "describe"]
