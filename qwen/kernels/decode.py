"""One batch-1 decode step through every transformer block in a single C call.

At batch 1 a Qwen-1.8B int8 step spent ~61 ms in the matrix-vector products and ~14 ms between them
(~0.6 ms per block of Python, dispatch, allocations and small ops). ``qwen_decode_layers`` (gemv.cpp)
runs the blocks' whole math (RMSNorm, the five quantized linears, RoPE, LogN, the KV-cache write,
attention, SwiGLU, residuals) with the same kernels and no Python in between. Window attention
(docs/long-context.md) is computed there too: a windowed layer's cache is a ring (slot g at index
g mod ring size) and the token attends to its last ``window`` slots only.

:class:`FusedDecoder` describes a model's blocks to it once (pointers to codes, scales, norms) and is
used by ``QWenModel.forward`` only where the result is the eager path's: eval mode, no autograd, fp32
on the CPU, one sequence and one new token, a plain unpadded float ``KVCache``, every block linear a
``QuantLinear`` running qwen.kernels' decode kernel or an fp32 ``nn.Linear`` / ``PackedLinear`` with a
plain [out, in] weight (so no LoRA wrappers), no forward hooks. Anything else runs the module path. ``QWEN_FUSED_DECODE=0`` (or ``model.transformer.fused_decode = False``)
turns it off. Agreement with the module path is tested in tests/test_fused_decode.py.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import torch
from torch import nn

from . import library

_p, _i64 = ctypes.c_void_p, ctypes.c_int64


class _QLinear(ctypes.Structure):
    _fields_ = [("codes", _p), ("scale", _p), ("szero", _p), ("bias", _p), ("perm", _p),
                ("N", _i64), ("K", _i64), ("G", _i64), ("B", _i64), ("bits", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln_1", _p), ("ln_2", _p), ("c_attn", _QLinear), ("attn_proj", _QLinear), ("w1", _QLinear),
                ("w2", _QLinear), ("mlp_proj", _QLinear)]


def _nothing() -> None:
    return None


def enabled() -> bool:
    return os.environ.get("QWEN_FUSED_DECODE", "1") != "0"


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


class FusedDecoder:
    """The blocks of one QWenModel, described for ``qwen_decode_layers``."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL, layers: Any, keep: list[Any],
                 watched: list[tuple[nn.Module, Any]], pointers: list[tuple[nn.Module, str, int]]) -> None:
        self.lib, self.layers, self._keep = lib, layers, keep
        self._watched, self._pointers = watched, pointers
        cfg = model.config
        self.num_layers = len(model.h)
        self.hidden, self.heads, self.head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.rot_dim, self.eps = cfg.rotary_dim, float(cfg.layer_norm_epsilon)

    @classmethod
    def build(cls, model: nn.Module) -> "FusedDecoder | None":
        """The decoder for ``model`` (a QWenModel), or None when its blocks are not all eligible."""
        from ..cpu_pack import PackedLinear
        from ..model import QWenAttention, QWenBlock, QWenMLP, RMSNorm
        from ..quant.linear import QuantLinear

        lib = library()
        if lib is None:
            return None
        layers = (_Layer * len(model.h))()
        keep: list[Any] = []
        watched: list[tuple[nn.Module, Any]] = []
        pointers: list[tuple[nn.Module, str, int]] = []  # (module, tensor attribute, data pointer) read by C
        for i, block in enumerate(model.h):
            if type(block) is not QWenBlock or type(block.attn) is not QWenAttention or type(block.mlp) is not QWenMLP:
                return None
            for name in ("ln_1", "ln_2"):
                ln = getattr(block, name)
                w = ln.weight
                if type(ln) is not RMSNorm or w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous():
                    return None
                if ln.eps != model.config.layer_norm_epsilon:
                    return None
                setattr(layers[i], name, w.data_ptr())
                pointers.append((ln, "weight", w.data_ptr()))
            watched += [(block, None), (block.attn, None), (block.mlp, None), (block.ln_1, None), (block.ln_2, None)]
            for field, lin in (("c_attn", block.attn.c_attn), ("attn_proj", block.attn.c_proj), ("w1", block.mlp.w1),
                               ("w2", block.mlp.w2), ("mlp_proj", block.mlp.c_proj)):
                desc = getattr(layers[i], field)
                dense = type(lin) is nn.Linear or (type(lin) is PackedLinear and lin.dense)
                if dense:  # fp32 weights, row-major: qwen_gemv_f32
                    attr = "weight" if type(lin) is nn.Linear else "packed"
                    w, b = getattr(lin, attr), lin.bias
                    if w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous():
                        return None
                    if b is not None and (b.dtype != torch.float32 or not b.is_contiguous()):
                        return None
                    desc.codes, desc.bias = w.data_ptr(), None if b is None else b.data_ptr()
                    desc.N, desc.K, desc.G, desc.B, desc.bits = w.shape[0], w.shape[1], w.shape[1], w.shape[1], 32
                    pointers += [(lin, attr, w.data_ptr())] + ([] if b is None else [(lin, "bias", b.data_ptr())])
                    watched.append((lin, None))
                    continue
                if type(lin) is not QuantLinear:
                    return None
                found = lin.decode_rows()
                if found is None:
                    return None
                rows, perm = found
                if perm is not None:
                    perm = perm.to(torch.int64).contiguous()
                    keep.append(perm)
                keep.append(rows)
                desc.codes, desc.scale, desc.szero = rows.codes.data_ptr(), rows.scales.data_ptr(), rows.scaled_zeros.data_ptr()
                desc.bias = None if rows.bias is None else rows.bias.data_ptr()
                desc.perm = None if perm is None else perm.data_ptr()
                desc.N, desc.K, desc.G, desc.B, desc.bits = (rows.out_features, rows.in_features, rows.group_size,
                                                             rows.block, rows.bits)
                watched.append((lin, lin._runtime))  # prepare() replaces _runtime: then rebuild
        decoder = cls(model, lib, layers, keep, watched, pointers)
        return decoder if decoder.still_valid() else None  # e.g. a hook is registered

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        # Raw pointers must not travel: a pickled or deep-copied model gets None and builds its own.
        return (_nothing, ())

    def still_valid(self) -> bool:
        """False once any block changed: a linear re-prepared, a float weight replaced, a hook added."""
        for module, runtime in self._watched:
            if _hooked(module) or (runtime is not None and module._runtime is not runtime):
                return False
        for module, name, ptr in self._pointers:
            t = getattr(module, name)
            if t is None or t.data_ptr() != ptr:
                return False
        return not _global_hooks()

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: float, cache: Any) -> torch.Tensor:
        """x [1, 1, hidden] -> the last block's output; writes this token's K/V into ``cache`` at cache.length."""
        out = x.reshape(self.hidden).clone()
        cos = cos.reshape(-1).float().contiguous()
        sin = sin.reshape(-1).float().contiguous()
        n = self.num_layers
        keys = (_p * n)(*[t.data_ptr() for t in cache.keys])
        values = (_p * n)(*[t.data_ptr() for t in cache.values])
        caps = (_i64 * n)(*[t.shape[2] for t in cache.keys])  # per layer: a windowed layer's ring is shorter
        windows = (_i64 * n)(*[w or 0 for w in cache.windows])
        self.lib.qwen_decode_layers(
            ctypes.addressof(self.layers), keys, values, n, out.data_ptr(), self.hidden, self.heads, self.head_dim,
            self.rot_dim, caps, windows, cache.length, cos.data_ptr(), sin.data_ptr(), logn, self.eps,
            torch.get_num_threads())
        return out.reshape(1, 1, self.hidden)


def fused_decode_step(model: nn.Module, x: torch.Tensor, cache: Any, mask: torch.Tensor | None,
                      output_hidden_states: bool) -> FusedDecoder | None:
    """The decode-step provider QWenModel.forward calls (registered in qwen/__init__.py): this model's
    FusedDecoder where it computes exactly what the blocks would, else None. Built once per model and
    kept in ``model._fused`` (rebuilt when a block changed)."""
    from ..cache import KVCache

    if (type(cache) is not KVCache or x.shape[0] != 1 or x.shape[1] != 1 or x.dtype != torch.float32
            or x.device.type != "cpu" or mask is not None or output_hidden_states or model.training
            or torch.is_grad_enabled() or cache.quantizer is not None or cache.padded
            or cache.dtype != torch.float32):
        return None
    if not enabled():
        return None
    if model._fused is None or not model._fused.still_valid():
        model._fused = FusedDecoder.build(model)
    if model._fused is None or not all(
            t.device.type == "cpu" and t.is_contiguous() for t in (*cache.keys, *cache.values)):
        return None
    return model._fused
