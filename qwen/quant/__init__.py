"""GPTQ / round-to-nearest int4 and int8 weights in the official AutoGPTQ layout (docs/quantization.md).

* ``layout``: the checkpoint format (pack/unpack, quantize_config.json, shapes; spec §10);
* ``gptq``: the GPTQ algorithm and round-to-nearest, per layer and per model;
* ``linear``: QuantLinear, the module that holds the official tensors and runs CPU int4/int8 kernels;
* ``calibration``: calibration sequences from the official SFT JSON format, JSONL or text.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .layout import QUANTIZE_CONFIG_NAME, GPTQConfig, QuantConfigError, dequantize, pack_gptq_tensors
from .linear import QuantLinear, prepare_quant_layers, quant_linear_layers

__all__ = [
    "QUANTIZE_CONFIG_NAME", "GPTQConfig", "QuantConfigError", "QuantLinear", "dequantize", "pack_gptq_tensors",
    "prepare_quant_layers", "quant_linear_layers", "quantize_model",
]


def quantize_model(model: nn.Module, config: GPTQConfig, method: str = "gptq",
                   calibration: Sequence[torch.Tensor] | None = None, progress: bool = True,
                   device: torch.device | str | None = None) -> nn.Module:
    """Quantize ``model``'s block linears in place with ``method`` "gptq" (needs ``calibration``) or "rtn"."""
    from .gptq import quantize_model_gptq, quantize_model_rtn

    if method == "rtn":
        return quantize_model_rtn(model, config, progress=progress)
    if method == "gptq":
        return quantize_model_gptq(model, config, calibration or [], progress=progress, device=device)
    raise QuantConfigError(f"method must be 'gptq' or 'rtn', got {method!r}")
