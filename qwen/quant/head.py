"""An int8 lm_head for CPU decode (opt-in: ``from_pretrained(..., int8_lm_head=True)``).

The official Int4/Int8 checkpoints quantize the transformer blocks only; their lm_head stays in float.
At Qwen-1.8B's size that head (151936 x 2048, 1.24 GB in fp32) is half of what an int4 model reads per
decoded token, so on a memory-bound CPU it caps the speedup of quantization. This module rounds it
to int8 once at load time (round to nearest, one scale per row and group of 128 inputs, symmetric:
codes 1..255 around 128) and runs it through the int8 decode kernel of qwen/kernels. The deviation
from the checkpoint is a relative weight error below 0.4% per group; the effect on the demo model's
perplexity is in docs/quantization.md. Calls with more than a few rows (full-sequence logits for
training or evaluation) rebuild fp32 panels of the weight in C and run the fp32 GEMM instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import kernels
from ..transforms import LoadTransform
from ..kernels import QuantizedRows

GROUP = 128


class Int8Head(nn.Module):
    """y = x W^T with W [N, K] held as int8 codes with per-(row, 128-input group) scales."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        n, k = weight.shape
        g = GROUP if k % GROUP == 0 else k
        w = weight.detach().float().reshape(n, k // g, g)
        scales = (w.abs().amax(dim=-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # [N, K/g]
        codes = (torch.round(w / scales[..., None]) + 128).clamp(1, 255).to(torch.uint8).reshape(n, k)
        self.in_features, self.out_features = k, n
        self.rows = QuantizedRows(codes, scales, torch.full_like(scales, 128.0), 8)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (materialises it all; for inspection and export)."""
        return self.rows.dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.numel() <= kernels.MAX_ROWS * self.in_features:
            return self.rows(x)
        # Many rows (full-sequence logits): fp32 panels rebuilt in C and the fp32 GEMM, not bf16, so
        # that evaluation logits carry no extra rounding.
        out = self.rows.matmul(x.reshape(-1, self.in_features).float(), torch.float32)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        raise RuntimeError("this model's lm_head was rounded to int8 at load time (int8_lm_head=True); saving it "
                           "would write rounded weights as if they were the checkpoint's. Reload without "
                           "int8_lm_head to save.")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 (group {self.rows.group_size})"


def quantize_lm_head(model: nn.Module) -> bool:
    """Replace ``model.lm_head`` by an Int8Head (CPU, fp32, kernels available); returns whether it did."""
    head = model.lm_head
    weight = getattr(head, "weight", None)
    if weight is None or weight.device.type != "cpu" or not kernels.available():
        return False
    model.lm_head = Int8Head(weight)  # a tied table stays in float for the embedding lookup
    return True


class Int8HeadTransform(LoadTransform):
    """``from_pretrained(..., int8_lm_head=True)`` (registered in qwen/__init__.py)."""

    name = "int8-lm-head"
    options = {"int8_lm_head": False}
    order = 10  # before CPU packing, which would otherwise repack the float head

    def finish(self, ctx: Any, model: nn.Module) -> None:
        if not ctx.options["int8_lm_head"]:
            return
        if ctx.dtype != torch.float32 or not quantize_lm_head(model):
            from ..checkpoint import CheckpointError

            raise CheckpointError(f"int8_lm_head needs an fp32 model on the CPU and the CPU kernels "
                                  f"({kernels.why_unavailable() or 'dtype ' + str(ctx.dtype)})")


INT8_HEAD_TRANSFORM = Int8HeadTransform()
