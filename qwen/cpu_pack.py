"""CPU inference: linear layers prepared for the CPU's fastest kernels (``PackedLinear``).

Batch-1 decode on a CPU streams every weight once per token, so its speed is the speed at which
the matrix-vector products read memory. MKL's gemv over PyTorch's [out, in] weights reads about
14-16 GB/s on our 2-core machines; oneDNN with weights reordered into its blocked layout 17-25 GB/s;
qwen.kernels' gemv on the plain [out, in] weights 21-24 GB/s (AMD Zen 3, AVX2). Where those kernels
build, a PackedLinear therefore keeps the plain weight, runs decode through them (and lets the fused
decode step read it), and runs prefill GEMMs on the same weight through oneDNN (short prompts) or
MKL (from ``MKL_MIN_ROWS`` rows, where MKL is faster); elsewhere it holds the oneDNN-packed weight
(measurements in docs/benchmarks.md).
Either way ``unpack`` and ``state_dict`` give back the exact original weights.

Packing is an inference-time transform. A packed model cannot be trained, moved to another
device, or wrapped by peft; ``unpack_linear_layers`` restores plain nn.Linear modules.
"""

from __future__ import annotations


from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from . import kernels
from .transforms import LoadTransform

_OP = getattr(torch.ops.mkldnn, "_linear_pointwise", None)

# From this many input rows on, a dense weight runs PyTorch's own GEMM (MKL) rather than oneDNN:
# on AMD Zen 3 with 2 threads, 1.8B-shaped layers gave MKL 173-188 GFLOP/s at 512 and 1024 rows
# against oneDNN's 138-164, while at 128 rows oneDNN is as fast or faster (150-161 vs 143-151).
MKL_MIN_ROWS = 256


def packing_supported(dtype: torch.dtype = torch.float32) -> bool:
    """True when this PyTorch build has the oneDNN linear ops and ``dtype`` is worth packing."""
    return dtype == torch.float32 and torch.backends.mkldnn.is_available() and _OP is not None


class PackedLinear(nn.Module):
    """y = x W^T + b for CPU inference, with W in the layout its kernels read fastest.

    With qwen.kernels available (x86-64 with AVX2 or AVX-512), W stays in PyTorch's [out, in] order:
    inputs of a few rows (decode) run our matrix-vector kernel, which streams it 20-35% faster than
    oneDNN does its packed copy (2048x11008-class layers, measured on AMD Zen 3: 21.6-23.8 vs 17.2-21.6
    GB/s), and the fused decode step (qwen/kernels/decode.py) reads it by pointer; prompts run oneDNN
    on the same dense weight (as fast as on its packed copy) up to ``MKL_MIN_ROWS`` rows and
    PyTorch's MKL GEMM from there on, which is 12-30% faster than oneDNN at 512-1024 rows. Without
    the kernels W is reordered once into oneDNN's blocked layout.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        if w.device.type != "cpu":
            raise ValueError("PackedLinear packs CPU weights only")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = w.dtype
        # What oneDNN is handed: the plain weight when our kernels also read it, else its reordered copy.
        self.dense = w.dtype == torch.float32 and kernels.available()
        w = w.contiguous()
        self.packed = w if self.dense else torch.ops.mkldnn._reorder_linear_weight(w, 1)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (a copy when it is held packed; the forward never materialises it)."""
        return self.packed if self.dense else self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError("packed weights live on the CPU; call qwen.cpu_pack.unpack_linear_layers(model) "
                               "before moving the model")
        if x.dtype != self.dtype:
            raise RuntimeError(f"PackedLinear holds {self.dtype} weights but got {x.dtype} input")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("packed linear layers are for inference; unpack them before training")
        if self.dense:
            rows = x.numel() // self.in_features
            if rows <= kernels.MAX_ROWS:
                return kernels.gemv_f32(x, self.packed, self.bias)
            if rows >= MKL_MIN_ROWS:
                return F.linear(x, self.packed, self.bias)
        return _OP(x.contiguous(), self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # Same keys as nn.Linear, so a packed model saves exactly like an unpacked one.
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def unpack(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


def _linear_children(model: nn.Module, cls: type) -> list[tuple[nn.Module, str]]:
    # (parent, name) pairs only: holding the children themselves would keep every replaced
    # weight alive until the end of the loop (peak memory = 2x the model).
    return [(parent, name) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is cls]


def pack_linear_layers(model: nn.Module) -> nn.Module:
    """Replace every CPU nn.Linear of ``model`` by a PackedLinear, in place (tied weights are skipped).

    Each layer is packed and its dense weight released before the next, so peak memory grows by
    one layer at most.
    """
    embedding_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    for parent, name in _linear_children(model, nn.Linear):
        child = getattr(parent, name)
        if child.weight.device.type != "cpu" or not packing_supported(child.weight.dtype):
            continue
        if child.weight.data_ptr() in embedding_ptrs:
            continue  # tied to the embedding: packing would duplicate it
        setattr(parent, name, PackedLinear(child))
        del child  # the dense weight is freed here, before the next layer is packed
    return model


def unpack_linear_layers(model: nn.Module) -> nn.Module:
    """Undo pack_linear_layers, in place."""
    for parent, name in _linear_children(model, PackedLinear):
        setattr(parent, name, getattr(parent, name).unpack())
    return model


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())


class CpuPackTransform(LoadTransform):
    """``from_pretrained(..., cpu_packed_weights=None|True|False)`` (registered in qwen/__init__.py): by
    default fp32 models placed entirely on the CPU get PackedLinear layers, frozen for inference."""

    name = "cpu-pack"
    options: dict[str, Any] = {"cpu_packed_weights": None}
    order = 20

    def finish(self, ctx: Any, model: nn.Module) -> None:
        pack = ctx.options["cpu_packed_weights"]
        if pack is None:
            pack = ctx.all_on_cpu and packing_supported(ctx.dtype)
        if pack:
            pack_linear_layers(model)
            # A packed model is for inference: frozen parameters let model(ids) run without no_grad().
            model.requires_grad_(False)


CPU_PACK_TRANSFORM = CpuPackTransform()
