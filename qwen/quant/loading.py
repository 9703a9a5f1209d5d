"""The hooks that let checkpoint.load_model/save_model read and write GPTQ checkpoints.

load_model builds the model on the meta device; ``install_quant_layers`` then swaps the quantized
block linears for (meta) QuantLinear modules, so the usual allocate-then-read-into loop fills their
official buffers straight from the safetensors files. Nothing from auto-gptq/optimum/transformers
is imported.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from .layout import (
    EXPECTED_DTYPES,
    QUANTIZE_CONFIG_NAME,
    QUANTIZED_MODULES,
    GPTQConfig,
    QuantConfigError,
    effective_group_size,
    load_quant_config,
)
from ..transforms import LoadTransform
from .linear import QuantLinear, quant_linear_layers


def _checkpoint_error(message: str) -> Exception:
    from ..checkpoint import CheckpointError

    return CheckpointError(message)


def read_checkpoint_quant_config(path: str, quantization_config: dict[str, Any]) -> GPTQConfig:
    try:
        return load_quant_config(path, quantization_config)
    except QuantConfigError as e:
        raise _checkpoint_error(str(e)) from None


def install_quant_layers(model: nn.Module, config: GPTQConfig) -> None:
    """Replace every block's quantized linears by empty QuantLinear modules (on the linears' device)."""
    for i, block in enumerate(model.transformer.h):
        for sub in QUANTIZED_MODULES:
            linear = block.get_submodule(sub)
            device = linear.weight.device
            try:
                layer = QuantLinear(linear.in_features, linear.out_features, config.bits, config.group_size,
                                    device=device)
            except QuantConfigError as e:
                raise _checkpoint_error(f"transformer.h.{i}.{sub}: {e}") from None
            parent, _, child = sub.rpartition(".")
            setattr(block.get_submodule(parent), child, layer)


def quant_load_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """The official tensor names of every QuantLinear and the buffers they load into."""
    return {f"{name}.{b}": buf for name, layer in quant_linear_layers(model)
            for b, buf in layer.named_buffers(recurse=False)}


def check_quant_tensor(file: str, name: str, dtype: torch.dtype) -> None:
    """Codes must be int32 as AutoGPTQ writes them; scales and bias any float type (converted on read)."""
    kind = name.rsplit(".", 1)[-1]
    expected = EXPECTED_DTYPES[kind]
    ok = dtype.is_floating_point if expected.is_floating_point else dtype == expected
    if not ok:
        raise _checkpoint_error(f"{file}: tensor {name!r} has dtype {dtype}, expected {expected} (GPTQ {kind})")


def finish_quant_load(model: nn.Module, loaded: set[str], path: str) -> set[str]:
    """Fill the optional tensors a checkpoint may omit and validate g_idx; returns the names filled in.

    ``bias`` defaults to zeros (AutoGPTQ always writes it, other GPTQ tools may not) and ``g_idx``
    to k // group_size (checkpoints written before act-order support have none).
    """
    filled: set[str] = set()
    for name, layer in quant_linear_layers(model):
        with torch.no_grad():
            if f"{name}.bias" not in loaded:
                layer.bias.zero_()
                filled.add(f"{name}.bias")
            if f"{name}.g_idx" not in loaded:
                g = effective_group_size(layer.in_features, layer.group_size)
                layer.g_idx.copy_(torch.arange(layer.in_features, dtype=torch.int32) // g)
                filled.add(f"{name}.g_idx")
        if f"{name}.qweight" in loaded:
            try:
                layer.check_tensors(where=f"{name}: ")
            except QuantConfigError as e:
                raise _checkpoint_error(f"{path}: {e}") from None
    return filled


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def quant_state_names(model: nn.Module) -> set[str]:
    """state_dict keys that belong to QuantLinear layers (saved with their official dtypes, never cast)."""
    return set(quant_load_targets(model))


def write_quantize_config(model: nn.Module, directory: str | os.PathLike) -> None:
    """quantize_config.json next to the weights, from config.json's quantization_config."""
    entry = getattr(model.config, "quantization_config", None)
    if not entry:
        return
    config = GPTQConfig.from_dict(entry)
    with open(os.path.join(directory, QUANTIZE_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config.to_quantize_config(), f, indent=2)
        f.write("\n")


__all__ = ["GPTQ_TRANSFORM", "read_checkpoint_quant_config", "install_quant_layers", "quant_load_targets", "check_quant_tensor",
           "finish_quant_load", "is_quantized", "quant_state_names", "write_quantize_config"]


_GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


class GPTQTransform(LoadTransform):
    """load_model/save_model for GPTQ checkpoints (registered in qwen/__init__.py; see qwen/transforms.py)."""

    name = "gptq"
    options = {"quant_kernel": "auto"}
    order = 30  # prepares the kernels last, after the int8 head and CPU packing

    def configure(self, ctx: Any) -> None:
        if not ctx.config.quantization_config:
            return
        ctx.state["gptq"] = read_checkpoint_quant_config(ctx.path, ctx.config.quantization_config)
        if ctx.placement["transformer.wte"].type == "cpu" and not ctx.dtype_given:
            ctx.dtype = torch.float32  # GPTQ configs ask for fp16, which CPUs cannot compute with at any useful speed

    def install(self, ctx: Any, model: nn.Module) -> None:
        if "gptq" in ctx.state:
            install_quant_layers(model, ctx.state["gptq"])

    def load_targets(self, ctx: Any, model: nn.Module) -> dict[str, torch.Tensor]:
        return quant_load_targets(model) if "gptq" in ctx.state else {}

    def check_tensor(self, ctx: Any, file: str, name: str, dtype: torch.dtype) -> None:
        check_quant_tensor(file, name, dtype)

    def after_tensors(self, ctx: Any, model: nn.Module, loaded: set[str]) -> set[str]:
        return finish_quant_load(model, loaded, ctx.path) if "gptq" in ctx.state else set()

    def explain_unexpected(self, ctx: Any, names: list[str]) -> str | None:
        if "gptq" not in ctx.state and any(n.endswith(_GPTQ_SUFFIXES) for n in names):
            return "holds GPTQ tensors but config.json has no quantization_config"
        return None

    def finish(self, ctx: Any, model: nn.Module) -> None:
        if "gptq" in ctx.state:
            from .linear import prepare_quant_layers

            prepare_quant_layers(model, ctx.dtype, ctx.options["quant_kernel"])
            model.requires_grad_(False)

    def saved_state(self, model: nn.Module) -> tuple[set[str], torch.dtype] | None:
        return (quant_state_names(model), torch.float16) if is_quantized(model) else None

    def write_files(self, model: nn.Module, directory: str) -> None:
        if is_quantized(model):
            write_quantize_config(model, directory)


GPTQ_TRANSFORM = GPTQTransform()
