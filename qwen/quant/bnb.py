"""bitsandbytes NF4 / FP4 / int8 weights: ``from_pretrained(..., load_in_4bit=True)`` as the early model card.

The official snippet was::

    quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_config, ...)

Both that form (a transformers ``BitsAndBytesConfig`` or a plain dict with the same keys) and the
shorthand ``load_in_4bit=True`` / ``load_in_8bit=True`` work. The checkpoint loads in float, then the
linear layers of the blocks (c_attn, c_proj, w1, w2, mlp.c_proj) become bitsandbytes layers; the
embeddings, norms and lm_head stay in float, as transformers does. This is also the base of Q-LoRA on
NF4 (``qwen train --method qlora --quantize nf4``; peft wraps bitsandbytes layers natively, and their
backward runs on the CPU too). Needs the ``bitsandbytes`` package (CPU backend works).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..transforms import LoadTransform

QUANTIZED_NAMES = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


@dataclass
class BnbSettings:
    bits: int  # 4 or 8
    quant_type: str = "nf4"  # nf4 | fp4 (4-bit only)
    compute_dtype: torch.dtype = torch.float32
    double_quant: bool = False  # bnb_4bit_use_double_quant: quantize the absmax statistics too
    int8_threshold: float = 6.0  # llm_int8_threshold: outlier features above it stay in float

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bitsandbytes quantization is 4- or 8-bit, got {self.bits}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")


def pop_bnb_settings(kwargs: dict[str, Any]) -> BnbSettings | None:
    """Take the bitsandbytes arguments out of from_pretrained's kwargs (None when there are none)."""
    qc = kwargs.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    four = bool(kwargs.pop("load_in_4bit", False))
    eight = bool(kwargs.pop("load_in_8bit", False))
    if qc is not None and (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
        kwargs.pop("quantization_config")
        four = four or bool(qc.get("load_in_4bit"))
        eight = eight or bool(qc.get("load_in_8bit"))
    if four and eight:
        raise ValueError("pass load_in_4bit or load_in_8bit, not both")
    if not (four or eight):
        return None
    qc = qc or {}
    dtype = qc.get("bnb_4bit_compute_dtype") or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    return BnbSettings(bits=4 if four else 8, quant_type=qc.get("bnb_4bit_quant_type", "nf4"), compute_dtype=dtype,
                       double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
                       int8_threshold=float(qc.get("llm_int8_threshold", 6.0)))


def _import_bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError("load_in_4bit / load_in_8bit need bitsandbytes: pip install bitsandbytes==0.50.2") from e
    return bitsandbytes


def quantize_with_bitsandbytes(model: nn.Module, settings: BnbSettings) -> nn.Module:
    """Replace the blocks' nn.Linear layers by bitsandbytes layers on the layers' own devices (in place)."""
    bnb = _import_bnb()
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.endswith(QUANTIZED_NAMES)]
    if not targets:
        raise ValueError("no plain nn.Linear block layers to quantize (load with cpu_packed_weights=False)")
    for name, lin in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        device = lin.weight.device
        weight = lin.weight.data.to(settings.compute_dtype if settings.bits == 4 else torch.float16)
        if settings.bits == 4:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    compute_dtype=settings.compute_dtype, quant_type=settings.quant_type,
                                    compress_statistics=settings.double_quant, device="meta")
            new.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type=settings.quant_type,
                                           compress_statistics=settings.double_quant)
        else:
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      has_fp16_weights=False, threshold=settings.int8_threshold, device="meta")
            new.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.data.to(settings.compute_dtype).cpu(), requires_grad=False)
        if settings.bits == 4 and (lin.out_features % 32 or lin.in_features % 64) and \
                hasattr(new, "support_avx512bf16_for_cpu"):
            # bitsandbytes 0.50's CPU repacking (AVX512-BF16 machines) needs out_features % 32 == 0 and whole
            # 64-input blocks per row, and crashes at the first inference call otherwise; such layers keep
            # the generic 4-bit path.
            new.support_avx512bf16_for_cpu = False
        setattr(parent, name.rsplit(".", 1)[1], new.to(device))  # .to() quantizes
    # What transformers sets on k-bit models: peft reads it to wrap these layers with its bitsandbytes
    # LoRA classes (otherwise Linear4bit, an nn.Linear subclass, would get the plain one; see Q-LoRA).
    setattr(model, "is_loaded_in_4bit" if settings.bits == 4 else "is_loaded_in_8bit", True)
    return model


class BnbTransform(LoadTransform):
    """``from_pretrained(..., load_in_4bit=True | load_in_8bit=True | quantization_config=BitsAndBytesConfig)``
    (registered in qwen/__init__.py): load the float model with plain nn.Linear layers, then replace them."""

    name = "bitsandbytes"

    def load_instead(self, path: str, kwargs: dict[str, Any]) -> nn.Module | None:
        bnb = pop_bnb_settings(kwargs)  # (adapter directories never get here: the LoRA transform runs first)
        if bnb is None:
            return None
        from ..checkpoint import load_model

        kwargs["cpu_packed_weights"] = False  # bitsandbytes replaces plain nn.Linear layers
        return quantize_with_bitsandbytes(load_model(path, **kwargs), bnb)


BNB_TRANSFORM = BnbTransform()
