"""GPU weight-only int2/int4/int8 GEMM straight from the official GPTQ tensors, written in Triton.

QuantLinear's ``triton`` kernel (chosen by default on CUDA when triton is installed). The weights stay
in the AutoGPTQ v1 layout of layout.py (``qweight`` packed along input rows, ``qzeros`` along output
columns with the "zero minus one" convention, fp16 ``scales``); each kernel rebuilds a tile of the
float weight in registers, ``(q - zero) * scale`` in fp32, and multiplies it without ever writing a
float copy of the layer:

* ``gptq_mm_kernel``: prefill / training shapes; tensor-core ``tl.dot`` in the activation dtype
  (fp16/bf16, the dequantized tile rounded once to that dtype) or exact fp32 (``input_precision="ieee"``,
  no TF32), accumulated in fp32;
* ``gptq_gemv_kernel``: decode shapes (M <= 8 rows): fp32 products summed in registers, many output
  columns per program, split-K so that a 4096-column layer still fills the GPU;
* ``gptq_mm_t_kernel``: the input gradient ``dL/dx = dL/dy @ W`` for Q-LoRA, from the same codes.

Any group size works: when the K-tile fits inside a group (group size a multiple of 16, or one
group per column; a shorter last group is fine) one row of scales and zeros serves the tile,
otherwise (groups of 8, g_idx that is not k // group_size) each row looks its group up in ``g_idx``. Act-order checkpoints (desc_act, g_idx a
permutation of whole groups) are reordered once when the layer is prepared: the rows of the packed
weight are permuted into group order, which is exactly the same product when the input's columns are
read in the same order; the kernels read them through the permutation, so no copy of the
activations is made.

torch.compile: the entry points are custom operators ``torch.ops.qwen.gptq_matmul`` and
``torch.ops.qwen.gptq_matmul_t`` with an autograd formula. With real (compiled) Triton they are
``torch.library.triton_op`` s, which inductor can see into and which CUDA graphs capture; under
``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the tests) they are opaque
``torch.library.custom_op`` s with a fake (shape) implementation, because the interpreter's kernels
cannot be traced.

On CUDA the kernels are run once on a tiny layer the first time a layer is prepared on a GPU
(``probe``): a triton that imports but cannot compile there makes QuantLinear fall back to
``dequant`` instead of failing at the first forward.

Launch configurations come from a small heuristic table (``forward_config``), not from autotuning,
so a first call never benchmarks and the choice is the same on every run.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Optional

import torch

from .layout import effective_group_size, pack_rows, unpack_rows, values_per_word

logger = logging.getLogger(__name__)

# The triton release that torch 2.13's CUDA wheels require (their metadata pins it).
TRITON_PIN = "3.7.1"
INSTALL_HINT = f"pip install triton=={TRITON_PIN}"
GEMV_MAX_ROWS = 8

VARIANTS = {"auto": 0, "gemv": 1, "mm": 2}


# ----------------------------------------------------------------------------------- availability
@functools.lru_cache(maxsize=1)
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language as _tl  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); {INSTALL_HINT}"
    return None


def triton_available() -> bool:
    """Whether the triton package imports (it does not say whether a GPU is there)."""
    return _import_error() is None


def why_unavailable() -> str | None:
    return _import_error()


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 when triton was first imported)."""
    return not _kernels_are_compiled()


def _require_triton() -> None:
    err = _import_error()
    if err is not None:
        raise ImportError(f"qwen.quant.triton_gptq needs triton: {err}")


@functools.lru_cache(maxsize=1)
def _kernels() -> ModuleType:
    _require_triton()
    from . import _triton_kernels

    return _triton_kernels


@functools.lru_cache(maxsize=1)
def _kernels_are_compiled() -> bool:
    from triton.runtime.jit import JITFunction

    return isinstance(_kernels().gptq_mm_kernel, JITFunction)


def device_supported(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device`` (None when they can)."""
    err = _import_error()
    if err is not None:
        return err
    if device.type == "cuda":
        return None if interpreting() else _probe(device.index if device.index is not None else
                                                  torch.cuda.current_device())
    if device.type == "cpu" and interpreting():
        return None
    return ("CUDA devices only (TRITON_INTERPRET=1, set before qwen's Triton kernels are first imported, runs "
            "them in Triton's CPU interpreter, for tests)")


@functools.lru_cache(maxsize=16)
def _probe(index: int) -> str | None:
    """Whether the kernels run on cuda:index (checked once per GPU and process), see probe()."""
    return probe(torch.device("cuda", index))


def probe(device: torch.device) -> str | None:
    """Run the kernels once on a tiny layer on ``device``; the reason they cannot run there, or None.

    A triton that imports may still fail to compile for this GPU (no ptxas, an unsupported
    architecture, a driver mismatch): finding out when a layer is prepared lets QuantLinear fall
    back to ``dequant`` instead of failing at the first forward."""
    try:
        gen = torch.Generator().manual_seed(0)
        k, n, g = 64, 64, 32
        q = torch.randint(0, 16, (k, n), dtype=torch.int32, generator=gen)
        zeros = torch.randint(1, 16, (k // g, n), dtype=torch.int32, generator=gen)
        scales = (torch.rand(k // g, n, generator=gen) * 0.1 + 0.01).half()
        g_idx = (torch.arange(k) // g).to(torch.int32)
        w = TritonGPTQWeight.from_official(pack_rows(q, 4).to(device), pack_rows(zeros.t() - 1, 4).t().to(device),
                                           scales.to(device), g_idx.to(device), 4, g)
        dense = ((q - zeros[g_idx.long()]).float() * scales[g_idx.long()].float()).to(device)  # [K, N]
        for m in (2, 32):
            x = torch.randn(m, k, generator=gen).half().to(device)
            err = (w.matmul(x).float() - x.float() @ dense).abs().max().item()
            gerr = (w.grad_input(x[:, :n].contiguous()).float() - x[:, :n].float() @ dense.t()).abs().max().item()
            if not (err < 1e-2 and gerr < 1e-2):
                return f"the Triton kernels gave wrong results on {device} (max error {max(err, gerr):.3g})"
    except Exception as e:  # noqa: BLE001 - any failure means: do not use them here
        logger.warning("Triton GPTQ kernels unavailable on %s: %s: %s", device, type(e).__name__, e)
        return f"the Triton kernels failed on {device}: {type(e).__name__}: {e}"
    return None


# ----------------------------------------------------------------------------------- weights
@dataclass
class TritonGPTQWeight:
    """The tensors the kernels read: the official codes, in group order when act-order permuted them.

    ``qweight`` is the official buffer itself unless ``perm`` is set (then its rows are permuted:
    row j holds input ``perm[j]``); ``g_idx`` is the group of each (permuted) row; ``natural`` says
    that g_idx is k // group_size, so K-tiles inside a group need no lookup."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    perm: torch.Tensor | None
    bias: torch.Tensor | None
    bits: int
    group_size: int  # effective: in_features for group_size -1
    natural: bool
    in_features: int
    out_features: int

    @classmethod
    def from_official(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      g_idx: torch.Tensor, bits: int, group_size: int,
                      bias: torch.Tensor | None = None) -> "TritonGPTQWeight":
        per = values_per_word(bits)
        k, n = qweight.shape[0] * per, qweight.shape[1]
        g = effective_group_size(k, group_size)
        gi = g_idx.to(torch.int64)
        perm = None
        if gi.numel() > 1 and bool((gi[1:] < gi[:-1]).any()):
            # Act-order: sort the rows into group order once. Stable, so rows of one group keep
            # their relative order (any order would be exact; this one is the cheapest to check).
            order = torch.argsort(gi, stable=True)
            qweight = pack_rows(unpack_rows(qweight, bits)[order], bits)
            gi = gi[order]
            perm = order.to(torch.int32).contiguous()
        natural = bool(torch.equal(gi, torch.arange(k, device=gi.device) // g))
        return cls(qweight=qweight.contiguous(), qzeros=qzeros.contiguous(), scales=scales.contiguous(),
                   g_idx=gi.to(torch.int32).contiguous(), perm=perm,
                   bias=None if bias is None else bias.contiguous(), bits=bits, group_size=g, natural=natural,
                   in_features=k, out_features=n)

    def __post_init__(self) -> None:
        _ops()  # define the operators now, eagerly: the forward must not do it under torch.compile

    def official_qweight(self) -> torch.Tensor:
        """qweight in the official (checkpoint) row order."""
        if self.perm is None:
            return self.qweight
        q = unpack_rows(self.qweight, self.bits)
        return pack_rows(q[torch.argsort(self.perm.long())], self.bits)

    def matmul(self, x: torch.Tensor, variant: str = "auto", split_k: int = 0) -> torch.Tensor:
        """x [..., K] @ W^T + bias -> [..., N] in x's dtype (differentiable in x)."""
        return gptq_linear(x, self, variant=variant, split_k=split_k)

    def grad_input(self, grad_y: torch.Tensor) -> torch.Tensor:
        """grad_y [..., N] @ W -> [..., K] (the input gradient of matmul)."""
        gy = grad_y.reshape(-1, self.out_features)
        gx = torch.ops.qwen.gptq_matmul_t(_rowmajor(gy), self.qweight, self.qzeros, self.scales, self.g_idx,
                                          self.perm, self.bits, self.group_size, self.natural)
        return gx.reshape(*grad_y.shape[:-1], self.in_features)


def gptq_linear(x: torch.Tensor, w: TritonGPTQWeight, variant: str = "auto", split_k: int = 0) -> torch.Tensor:
    """y = x W^T + bias through ``torch.ops.qwen.gptq_matmul``.

    ``variant``: "auto" (the GEMV kernel up to 8 rows, the tensor-core one beyond), "gemv" or "mm";
    ``split_k``: K-splits (0: chosen from the shape and the GPU's size)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {w.in_features}")
    x2 = _rowmajor(x.reshape(-1, w.in_features))
    # The operator is defined by TritonGPTQWeight's constructor (see __post_init__).
    y = torch.ops.qwen.gptq_matmul(x2, w.qweight, w.qzeros, w.scales, w.g_idx, w.perm, w.bias, w.bits,
                                   w.group_size, w.natural, VARIANTS[variant], int(split_k))
    return y.reshape(*x.shape[:-1], w.out_features)


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class LaunchConfig:
    kernel: str  # "gemv" or "mm"
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    tiles_per_split: int
    tile_group: bool
    num_warps: int
    num_stages: int


def _cdiv(a: int, b: int) -> int:
    # Integer division (also for SymInts under torch.compile, where a float ceil would specialise).
    return -(-a // b)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _fit_tile(block_k: int, k: int, group_size: int, natural: bool) -> tuple[int, bool]:
    """(BLOCK_K, tile_group): the largest BLOCK_K <= block_k (down to 16, tl.dot's minimum) that keeps
    every K-tile inside one group; when none does, block_k with a per-row group lookup."""
    if natural and group_size >= k:
        return block_k, True
    if natural:
        b = block_k
        while b >= 16:
            if group_size % b == 0:
                return b, True
            b //= 2
    return block_k, False


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _cuda_programs_wanted(device: torch.device) -> int:
    # Enough programs in flight to saturate memory bandwidth: a few per streaming multiprocessor.
    if device.type != "cuda" or interpreting():
        return 1
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def forward_config(m: int, n: int, k: int, group_size: int, natural: bool, dtype: torch.dtype,
                   device: torch.device, variant: int = 0, split_k: int = 0) -> LaunchConfig:
    """The launch of ``gptq_matmul`` for an [m, k] x [k, n] product (heuristics, see module docstring)."""
    fp32 = dtype == torch.float32
    gemv = variant == 1 or (variant == 0 and m <= GEMV_MAX_ROWS)
    if gemv:
        if m > GEMV_MAX_ROWS:
            raise ValueError(f"the gemv kernel takes at most {GEMV_MAX_ROWS} rows, got {m}")
        bm = _next_pow2(max(m, 1))
        # Keep the [BM, BK, BN] product tile at <= 16K fp32 values (registers of 4 warps).
        bn, bk = (128, 64) if bm <= 2 else (64, 32)
        warps, stages = (8 if bm * bn * bk >= 16384 else 4), 2
    else:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64 if (m <= 64 or fp32) else 128
        bn = 64 if fp32 or n < 128 else 128
        bk = 64
        warps = 8 if bm * bn >= 128 * 128 else 4
        stages = 2 if fp32 else 3
    bk, tile = _fit_tile(bk, k, group_size, natural)
    k_tiles = max(1, _cdiv(k, bk))
    programs = (1 if gemv else _cdiv(m, bm)) * _cdiv(n, bn)
    if split_k > 0:
        split = split_k
    else:
        # Split K only while there are too few output tiles, and keep >= 4 K-tiles per split.
        split = max(1, min(_cuda_programs_wanted(device) // max(programs, 1), k_tiles // 4))
    split = max(1, min(split, k_tiles))
    per_split = _cdiv(k_tiles, split)
    split = _cdiv(k_tiles, per_split)  # no empty splits
    return LaunchConfig("gemv" if gemv else "mm", bm, bn, bk, split, per_split, tile, warps, stages)


def backward_config(m: int, n: int, k: int, group_size: int, natural: bool, dtype: torch.dtype) -> LaunchConfig:
    fp32 = dtype == torch.float32
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bk = 64
    bn = 32 if fp32 else 64  # fp32 operands take twice the shared memory per element
    bk, tile = _fit_tile(bk, k, group_size, natural)
    return LaunchConfig("mm_t", bm, bn, bk, 1, _cdiv(k, bk), tile, 4, 2 if fp32 else 3)


# ----------------------------------------------------------------------------------- launches
def _check_inputs(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[int, int, int]:
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D input, got shape {list(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"inputs must be float16, bfloat16 or float32, not {x.dtype}")
    per = values_per_word(bits)
    k, n = qweight.shape[0] * per, qweight.shape[1]
    if x.shape[1] != k:
        raise ValueError(f"input has {x.shape[1]} features, the packed weight {k}")
    if scales.shape[1] != n:
        raise ValueError(f"scales have {scales.shape[1]} columns, qweight {n}")
    return x.shape[0], n, k


def _fp32_dot(dtype: torch.dtype) -> bool:
    # Triton's interpreter multiplies bf16 operands as their raw 16-bit patterns (numpy has no bf16), so
    # there bf16 tiles go through the fp32 dot: bf16 x bf16 products are exact in fp32, same result.
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def _launch_matmul(wrap: Callable[[Any], Any], x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                   scales: torch.Tensor, g_idx: torch.Tensor, perm: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], bits: int, group_size: int, natural: bool, variant: int,
                   split_k: int) -> torch.Tensor:
    m, n, k = _check_inputs(x, qweight, scales, bits)
    if m == 0:
        return x.new_zeros(0, n)
    kern = _kernels()
    cfg = forward_config(m, n, k, group_size, natural, x.dtype, x.device, variant, split_k)
    split = cfg.split_k > 1
    out = (torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=x.device) if split
           else torch.empty(m, n, dtype=x.dtype, device=x.device))
    # Pointer arguments a flag turns off still need a tensor; g_idx stands in.
    perm_t = perm if perm is not None else g_idx
    bias_t = bias if bias is not None else g_idx
    common = dict(BITS=bits, TILE_GROUP=cfg.tile_group, HAS_PERM=perm is not None, HAS_BIAS=bias is not None,
                  SPLIT=split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args = (x, perm_t, qweight, qzeros, scales, g_idx, bias_t, out, m, n, k, x.stride(0), group_size,
            cfg.tiles_per_split)
    if cfg.kernel == "gemv":
        grid = (_cdiv(n, cfg.block_n), cfg.split_k)
        wrap(kern.gptq_gemv_kernel)[grid](*args, **common)
    else:
        grid = (_cdiv(m, cfg.block_m) * _cdiv(n, cfg.block_n), cfg.split_k)
        wrap(kern.gptq_mm_kernel)[grid](*args, IEEE=_fp32_dot(x.dtype), GROUP_M=8, **common)
    if not split:
        return out
    y = out.sum(0)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def _launch_matmul_t(wrap: Callable[[Any], Any], grad: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                     scales: torch.Tensor, g_idx: torch.Tensor, perm: Optional[torch.Tensor], bits: int,
                     group_size: int, natural: bool) -> torch.Tensor:
    per = values_per_word(bits)
    k, n = qweight.shape[0] * per, qweight.shape[1]
    if grad.dim() != 2 or grad.shape[1] != n:
        raise ValueError(f"expected a gradient of shape [M, {n}], got {list(grad.shape)}")
    m = grad.shape[0]
    # Every input column is written exactly once (perm is a bijection), so no zero-fill is needed.
    out = torch.empty(m, k, dtype=grad.dtype, device=grad.device)
    if m == 0:
        return out
    cfg = backward_config(m, n, k, group_size, natural, grad.dtype)
    grid = (_cdiv(m, cfg.block_m) * _cdiv(k, cfg.block_k),)
    wrap(_kernels().gptq_mm_t_kernel)[grid](
        grad, perm if perm is not None else g_idx, qweight, qzeros, scales, g_idx, out, m, n, k, grad.stride(0),
        group_size, BITS=bits, TILE_GROUP=cfg.tile_group, HAS_PERM=perm is not None,
        IEEE=_fp32_dot(grad.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=8, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


# ----------------------------------------------------------------------------------- operators
@dataclass(frozen=True)
class _Ops:
    matmul: Callable[..., torch.Tensor]
    matmul_t: Callable[..., torch.Tensor]
    traceable: bool  # triton_op (inductor sees the kernels) rather than an opaque custom_op


@functools.lru_cache(maxsize=1)
def _ops() -> _Ops:
    """Define torch.ops.qwen.gptq_matmul / gptq_matmul_t once per process (after triton is imported)."""
    _kernels()
    traceable = _kernels_are_compiled() and hasattr(torch.library, "triton_op")
    if traceable:
        define, wrap = torch.library.triton_op, torch.library.wrap_triton
    else:
        define, wrap = torch.library.custom_op, (lambda kernel: kernel)

    @define("qwen::gptq_matmul", mutates_args=())
    def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor, perm: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int,
                    group_size: int, natural: bool, variant: int, split_k: int) -> torch.Tensor:
        return _launch_matmul(wrap, x, qweight, qzeros, scales, g_idx, perm, bias, bits, group_size, natural,
                              variant, split_k)

    @define("qwen::gptq_matmul_t", mutates_args=())
    def gptq_matmul_t(grad: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      g_idx: torch.Tensor, perm: Optional[torch.Tensor], bits: int, group_size: int,
                      natural: bool) -> torch.Tensor:
        return _launch_matmul_t(wrap, grad, qweight, qzeros, scales, g_idx, perm, bits, group_size, natural)

    if not traceable:
        # triton_op derives shapes by running its body on fake tensors; an opaque op needs them spelt out.
        @gptq_matmul.register_fake
        def _(x, qweight, qzeros, scales, g_idx, perm, bias, bits, group_size, natural, variant, split_k):
            return x.new_empty(x.shape[0], qweight.shape[1])

        @gptq_matmul_t.register_fake
        def _(grad, qweight, qzeros, scales, g_idx, perm, bits, group_size, natural):
            return grad.new_empty(grad.shape[0], qweight.shape[0] * (32 // bits))

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _x, qweight, qzeros, scales, g_idx, perm, _bias, bits, group_size, natural, _v, _s = inputs
        ctx.save_for_backward(qweight, qzeros, scales, g_idx, perm)
        ctx.meta = (bits, group_size, natural)

    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:
        qweight, qzeros, scales, g_idx, perm = ctx.saved_tensors
        bits, group_size, natural = ctx.meta
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.qwen.gptq_matmul_t(grad_y.contiguous(), qweight, qzeros, scales, g_idx, perm, bits,
                                              group_size, natural)
        # Codes, scales and bias are frozen (Q-LoRA trains adapters next to the layer, not the layer).
        return (gx,) + (None,) * 11

    gptq_matmul.register_autograd(backward, setup_context=setup_context)
    return _Ops(matmul=torch.ops.qwen.gptq_matmul, matmul_t=torch.ops.qwen.gptq_matmul_t, traceable=traceable)


def ops_traceable() -> bool:
    """True when the operators are triton_ops (compiled Triton), False when opaque custom ops (interpreter)."""
    return _ops().traceable


__all__ = [
    "TRITON_PIN", "INSTALL_HINT", "GEMV_MAX_ROWS", "TritonGPTQWeight", "LaunchConfig", "gptq_linear",
    "forward_config", "backward_config", "triton_available", "why_unavailable", "interpreting",
    "device_supported", "ops_traceable", "probe",
]
