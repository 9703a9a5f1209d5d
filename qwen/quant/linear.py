"""QuantLinear: a GPTQ-quantized linear layer holding the official tensors, with CPU kernels.

The module's buffers are the official AutoGPTQ v1 tensors (qweight, qzeros, scales, g_idx, bias;
see layout.py), so ``state_dict()`` keys and dtypes equal those of an official -Int4/-Int8
checkpoint and a quantized model saves in the official layout with no conversion. ``model.to(...)``
moves them but never changes their dtypes.

The forward runs one of these kernels, chosen per layer on the first call (or by ``prepare``) from
(bits, group layout, device, input dtype); ``QuantLinear.kernel`` names the one in use. None of the
default ones quantizes activations per tensor: real 7B/14B models have input channels 20-100x larger
than the rest, and a per-tensor 8-bit grid would spend its resolution on them (docs/quantization.md,
"Outlier channels"):

``qwen-kernels``
    int8 and int4 on CPU with fp32 inputs (groups of whole 32/64-input chunks; act-order too): our
    kernels (qwen/kernels). Up to ``kernels.panel_min_rows()`` rows (decode, the server's batched
    decode, short chunks): the matrix-vector kernel with activations rounded to int16 per row
    (relative 1.5e-5 of the row's largest value). Beyond (prefill): the weight is rebuilt a panel at a
    time by a C routine and multiplied by the GEMM library, in bf16 on CPUs with AMX/AVX512-BF16
    (per-element rounding, 2^-9 relative) and fp32 elsewhere. Only these codes are kept (qweight is
    rebuilt from them when read), so the layer holds one byte per int8 weight, half a byte per int4.
``int4-tinygemm``
    4-bit on CPU where our kernels do not apply (bf16 inputs, groups of 32, no C compiler):
    ``torch._weight_int4pack_mm_for_cpu``, PyTorch's groupwise int4 kernel, which dequantizes weight
    tiles in registers. Needs N % 16 == 0 and groups that are whole multiples of 32 inputs dividing K.
    Act-order checkpoints run it too: the inputs are gathered into group order first. W = s * (q - z)
    is re-expressed as (q - 8) * s + s * (8 - z), the kernel's form. It runs in bfloat16
    (activations, scales and outputs; fp32 accumulation): ~0.4% rounding, like the fp16 of the official
    GPU kernels.
``int8-fbgemm`` (opt-in only)
    PyTorch's dynamic int8 linear (fbgemm) with the exact int8 weights, one call per group. Each call
    quantizes its activations to 8 bits with one scale for the whole tensor (7 bits on CPUs without
    VNNI): fast, but a few outlier channels ruin it (+109% perplexity on the demo model with 50x
    channels), so ``auto`` never picks it.
``int8-rowwise`` (opt-in only)
    fbgemm on weights re-rounded to one scale per row; lossy twice over, kept for comparisons.
``triton`` (CUDA; the default there when triton is installed)
    Our Triton kernels (triton_gptq.py): the weight tile is rebuilt in registers from the official
    codes and multiplied, a tensor-core GEMM for prefill, a split-K GEMV for up to 8 rows, and the
    input gradient (Q-LoRA) from the same codes. 2/4/8 bits, any group size, act-order (the packed
    rows are permuted into group order once; the kernels read the inputs through the permutation).
    fp16/bf16 inputs multiply the weight rounded to that dtype, fp32 inputs exactly (no TF32); fp32
    accumulation. ``TRITON_INTERPRET=1`` runs it on the CPU in Triton's interpreter (tests only).
``tinygemm-cuda`` (CUDA, opt-in only)
    PyTorch's CUDA int4 kernel ``torch._weight_int4pack_mm`` on the codes repacked into its tiled
    layout (4-bit, groups whole multiples of 32, N % 8 == 0, K % 32 == 0; act-order gathers the inputs):
    bf16 activations, scales and outputs like ``int4-tinygemm``.
``dequant``
    Everything else (2-bit on CPU, groups of unequal sizes, shapes the kernels reject, GPUs without
    triton): dequantize a slice of input rows at a time into the input dtype and matmul. Exact up to
    float rounding and never more than a few MB of float weights at once, but slow (the reference path).

``prepare(..., kernel="dequant")`` forces the reference path (used by tests to check the kernels).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from .layout import (
    EXPECTED_DTYPES,
    QuantConfigError,
    pack_rows,
    dequantize,
    effective_group_size,
    expected_shapes,
    num_groups,
    pack_gptq_tensors,
    unpack_cols,
    unpack_rows,
    validate_bits,
    validate_group_size,
)

logger = logging.getLogger(__name__)

KERNELS = ("auto", "qwen-kernels", "int4-tinygemm", "int8-fbgemm", "int8-rowwise", "triton", "tinygemm-cuda",
           "dequant")
_TINYGEMM_GROUPS = (256, 128, 64, 32)
# Float weights the dequant path may hold at once (elements): bounds its working set.
_DEQUANT_CHUNK_ELEMENTS = 1 << 21


class QuantLinear(nn.Module):
    """y = x W^T + bias with W stored as GPTQ codes (official buffers, see module docstring)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits = validate_bits(bits)
        self.group_size = validate_group_size(group_size)
        per = 32 // self.bits
        if in_features % per or out_features % per:
            raise QuantConfigError(
                f"a {bits}-bit layer packs {per} values per int32 word: in_features ({in_features}) and "
                f"out_features ({out_features}) must be multiples of {per}"
            )
        for name, shape in expected_shapes(in_features, out_features, bits, group_size).items():
            self.register_buffer(name, torch.zeros(shape, dtype=EXPECTED_DTYPES[name], device=device))
        self.kernel: str | None = None  # the kernel in use, chosen by prepare()
        self.decode_kernel: str | None = None  # the int16 gemv of qwen-kernels (few-row inputs), when it runs
        # True while qweight's storage is dropped because the int8 kernel's packed copy holds the
        # same codes; state_dict() and anything else that reads qweight rebuild it (see _release_codes).
        self._codes_released = False
        self._runtime: dict[str, Any] = {}
        self._prepared_for: tuple[Any, ...] | None = None
        self._requested_kernel = "auto"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                   bits: int, group_size: int, bias: torch.Tensor | None = None) -> "QuantLinear":
        """A layer from integer codes q [N, K], scales/zeros [G, N] (true zero points) and g_idx [K]."""
        n, k = q.shape
        layer = cls(k, n, bits, group_size, device=q.device)
        tensors = pack_gptq_tensors(q, scales, zeros, g_idx, bits, bias)
        for name, t in tensors.items():
            getattr(layer, name).copy_(t)
        return layer

    # ------------------------------------------------------------------ weights
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] the codes stand for (materialises the whole layer; for checks and export)."""
        return dequantize(self._official_qweight(), self.qzeros, self.scales, self.g_idx, self.bits, dtype)

    def _release_codes(self) -> None:
        # Our kernels' codes and the fbgemm-packed int8 weight are exact copies of the official codes
        # (code_matrix / linear_unpack give them back), so keeping qweight too would double the memory.
        # The Triton kernel's act-order copy (rows in group order) is one too.
        triton_copy = self.kernel == "triton" and self._runtime["weight"].perm is not None
        if (self.kernel in ("qwen-kernels", "int8-fbgemm") or triton_copy) and not self._codes_released:
            self._buffers["qweight"] = torch.empty(0, dtype=torch.int32, device=self.qweight.device)
            self._codes_released = True

    def _official_qweight(self) -> torch.Tensor:
        """qweight, rebuilt from the int8 kernel's packed weight when its storage was released."""
        if not self._codes_released:
            return self.qweight
        rt = self._runtime
        if self.kernel == "triton":
            return rt["weight"].official_qweight()
        if self.kernel == "qwen-kernels":
            q = rt["gemv"].code_matrix().t().to(torch.int32)  # [K, N], group order
            perm = rt["gemv_perm"]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                parts = [torch.ops.quantized.linear_unpack(p)[0].int_repr() for p in rt["packed"]]  # [N, slice]
            q = torch.cat(parts, dim=1).t().to(torch.int32) + 128  # [K, N], group order
            perm = rt["perm"]
        if perm is not None:
            q = q[torch.argsort(perm)]
        return pack_rows(q, self.bits)

    def _restore_codes(self) -> None:
        if self._codes_released:
            self._buffers["qweight"] = self._official_qweight()
            self._codes_released = False

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._codes_released:
            destination[prefix + "qweight"] = self._official_qweight()

    def check_tensors(self, where: str = "") -> None:
        """Validate g_idx against the group count (catches checkpoints whose config does not match the tensors)."""
        groups = num_groups(self.in_features, self.group_size)
        if self.g_idx.numel():
            lo, hi = int(self.g_idx.min()), int(self.g_idx.max())
            if lo < 0 or hi >= groups:
                raise QuantConfigError(
                    f"{where}g_idx holds group {lo if lo < 0 else hi}, but the layer has {groups} groups "
                    f"(in_features {self.in_features}, group_size {self.group_size})"
                )

    def _apply(self, fn: Any, recurse: bool = True) -> "QuantLinear":
        # Keep the official dtypes through model.to(dtype)/half()/float(): a saved model must keep
        # int32 codes and float16 scales and bias whatever the compute dtype.
        self._restore_codes()
        dtypes = {name: b.dtype for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, dtype in dtypes.items():
            b = self._buffers[name]
            if b is not None and b.dtype != dtype:
                self._buffers[name] = b.to(dtype)
        self._reset_runtime()
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        if self._codes_released:  # the incoming codes replace the released ones: only the shape is needed
            shape = expected_shapes(self.in_features, self.out_features, self.bits, self.group_size)["qweight"]
            self._buffers["qweight"] = torch.empty(shape, dtype=torch.int32, device=self.qweight.device)
            self._codes_released = False
        super()._load_from_state_dict(*args, **kwargs)
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._runtime = {}
        self._prepared_for = None
        self.kernel = None
        self.decode_kernel = None

    # ------------------------------------------------------------------ kernels
    def prepare(self, device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                kernel: str | None = None) -> str:
        """Choose and build the kernel for inputs of ``dtype`` on ``device``; returns its name.

        A kernel named here is used from then on (``"auto"`` restores the choice); one that cannot run
        the layer raises ValueError and leaves the layer as it was."""
        wanted = self._requested_kernel if kernel is None else kernel
        if wanted not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {wanted!r}")
        device = torch.device(device) if device is not None else self.qweight.device
        if wanted != "auto":
            reason = self._unsupported_reason(wanted, device, dtype)
            if reason is not None:
                raise ValueError(f"kernel {wanted!r} cannot run this layer: {reason}")
        self._requested_kernel = wanted
        self._restore_codes()
        self._reset_runtime()
        # Triton only where it compiles: under TRITON_INTERPRET=1 it would also accept CPU tensors, and
        # the interpreter is far too slow to be chosen for anyone.
        auto = ["qwen-kernels", "int4-tinygemm"] + (["triton"] if device.type == "cuda" else []) + ["dequant"]
        candidates = [wanted] if wanted != "auto" else auto
        for name in candidates:
            if self._unsupported_reason(name, device, dtype) is None:
                build = getattr(self, "_build_" + name.replace("-", "_"))
                build(device, dtype)
                self.kernel = name
                self._prepared_for = (device.type, device.index, dtype, self._requested_kernel)
                self._release_codes()
                return name
        raise AssertionError("the dequant kernel runs everything")  # pragma: no cover

    def _unsupported_reason(self, name: str, device: torch.device, dtype: torch.dtype) -> str | None:
        if name == "dequant":
            return None
        if name == "triton":
            return self._triton_reason(device, dtype)
        if name == "tinygemm-cuda":
            return self._tinygemm_cuda_reason(device, dtype)
        if device.type != "cpu":
            return "CPU only"
        if dtype not in (torch.float32, torch.bfloat16):
            return f"inputs must be float32 or bfloat16, not {dtype}"
        if name == "qwen-kernels":
            return self._qwen_kernels_reason(dtype)
        if name == "int4-tinygemm":
            if self.bits != 4:
                return "4-bit layers only"
            if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
                return "this PyTorch build has no _weight_int4pack_mm_for_cpu"
            if self.out_features % 16:
                return f"out_features ({self.out_features}) must be a multiple of 16"
            if _tinygemm_group(self.in_features, self.group_size) is None:
                return (f"group size {self.group_size} with in_features {self.in_features}: groups must be whole "
                        "multiples of 32 inputs that divide in_features")
            if _group_order(self.g_idx, self.in_features, self.group_size) is None:
                return "g_idx does not split the inputs into equal groups"
            return None
        if name == "int8-fbgemm":
            if self.bits != 8:
                return "8-bit layers only"
            if not _fbgemm_available():
                return "no fbgemm/x86 quantized engine in this PyTorch build"
            if self._one_group_per_row():
                return None
            if self.in_features % effective_group_size(self.in_features, self.group_size):
                return "the last group is shorter than the others"
            if _group_order(self.g_idx, self.in_features, self.group_size) is None:
                return "g_idx does not split the inputs into equal groups"
            return None
        if name == "int8-rowwise":
            return None if _fbgemm_available() else "no fbgemm/x86 quantized engine in this PyTorch build"
        return f"unknown kernel {name!r}"

    def _qwen_kernels_reason(self, dtype: torch.dtype) -> str | None:
        from .. import kernels

        if dtype != torch.float32:
            return f"fp32 inputs only, not {dtype}"
        if self.bits not in (4, 8):
            return "4- and 8-bit layers only"
        g = effective_group_size(self.in_features, self.group_size)
        chunk = 64 if self.bits == 4 else 32
        if self.in_features % g or g % chunk:
            return f"groups must be whole multiples of {chunk} inputs dividing in_features ({self.in_features}), not {g}"
        if _group_order(self.g_idx, self.in_features, self.group_size) is None:
            return "g_idx does not split the inputs into equal groups"
        if not kernels.available():
            return f"qwen.kernels unavailable: {kernels.why_unavailable()}"
        return None

    def _triton_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        from . import triton_gptq

        why = triton_gptq.device_supported(device)
        if why is not None:
            return why
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"inputs must be float16, bfloat16 or float32, not {dtype}"
        if dtype == torch.bfloat16 and device.type == "cuda" and not triton_gptq.interpreting():
            if torch.cuda.get_device_capability(device)[0] < 8:
                return "bfloat16 tensor-core products need a GPU of compute capability 8.0 or newer"
        return None

    def _tinygemm_cuda_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return "CUDA only"
        if self.bits != 4:
            return "4-bit layers only"
        aten = torch.ops.aten
        if not (hasattr(aten, "_weight_int4pack_mm") and hasattr(aten, "_convert_weight_to_int4pack")):
            return "this PyTorch build has no _weight_int4pack_mm"
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"inputs must be float16, bfloat16 or float32, not {dtype}"
        major, _minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return "needs a GPU of compute capability 8.0 or newer (bf16 tensor cores)"
        if self.out_features % 8:
            return f"out_features ({self.out_features}) must be a multiple of 8"
        if self.in_features % 32:
            return f"in_features ({self.in_features}) must be a multiple of 32"
        if _tinygemm_group(self.in_features, self.group_size) is None:
            return (f"group size {self.group_size} with in_features {self.in_features}: groups must be whole "
                    "multiples of 32 inputs that divide in_features")
        if _group_order(self.g_idx, self.in_features, self.group_size) is None:
            return "g_idx does not split the inputs into equal groups"
        return None

    def _one_group_per_row(self) -> bool:
        if self.scales.shape[0] == 1:
            return True
        z = unpack_cols(self.qzeros, self.bits)
        return bool((self.scales == self.scales[:1]).all()) and bool((z == z[:1]).all())

    def _build_dequant(self, device: torch.device, dtype: torch.dtype) -> None:
        self._runtime = {}
        self._natural_groups()

    def _build_int4_tinygemm(self, device: torch.device, dtype: torch.dtype) -> None:
        g = effective_group_size(self.in_features, self.group_size)
        tile = _tinygemm_group(self.in_features, self.group_size)
        assert tile is not None
        order = _group_order(self.g_idx, self.in_features, self.group_size)
        assert order is not None
        q = unpack_rows(self.qweight, self.bits)  # [K, N]
        perm = None if order is True else order
        if perm is not None:
            q = q[perm]
        codes = q.t().contiguous()  # [N, K] int32 in 0..15, what the packing op expects
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        del q, codes
        scales = self.scales.float()
        zeros = (unpack_cols(self.qzeros, self.bits) + 1).float()
        # The kernel computes (q - 8) * scale + offset; s * (q - z) = (q - 8) * s + s * (8 - z).
        sz = torch.stack([scales, scales * (8 - zeros)], dim=-1)  # [G, N, 2]
        if self.group_size == -1 or g != tile:
            sz = sz.repeat_interleave(g // tile, dim=0)[: self.in_features // tile]
        self._runtime = {
            "packed": packed,
            "scales_zeros": sz.to(torch.bfloat16).contiguous(),
            "tile": tile,
            "perm": perm,
            "bias": self.bias.to(dtype),
        }

    def _build_triton(self, device: torch.device, dtype: torch.dtype) -> None:
        from .triton_gptq import TritonGPTQWeight

        self._runtime = {"weight": TritonGPTQWeight.from_official(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.group_size, self.bias)}

    def _build_tinygemm_cuda(self, device: torch.device, dtype: torch.dtype) -> None:
        # The same re-expression as int4-tinygemm (W = (q - 8) * s + s * (8 - z)); the CUDA packing op
        # takes two codes per byte, the even input in the high nibble, and tiles them for its mma layout.
        g = effective_group_size(self.in_features, self.group_size)
        tile = _tinygemm_group(self.in_features, self.group_size)
        assert tile is not None
        order = _group_order(self.g_idx, self.in_features, self.group_size)
        assert order is not None
        perm = None if order is True else order
        q = unpack_rows(self.qweight, self.bits)  # [K, N]
        if perm is not None:
            q = q[perm]
        codes = q.t().contiguous()  # [N, K]
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()
        inner_k_tiles = 8 if self.in_features % 128 == 0 else 4 if self.in_features % 64 == 0 else 2
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
        del q, codes, pairs
        scales = self.scales.float()
        zeros = (unpack_cols(self.qzeros, self.bits) + 1).float()
        sz = torch.stack([scales, scales * (8 - zeros)], dim=-1)  # [G, N, 2]
        if self.group_size == -1 or g != tile:
            sz = sz.repeat_interleave(g // tile, dim=0)[: self.in_features // tile]
        self._runtime = {"packed": packed, "scales_zeros": sz.to(torch.bfloat16).contiguous(), "tile": tile,
                         "perm": perm, "bias": self.bias.to(dtype)}

    def _build_int8_fbgemm(self, device: torch.device, dtype: torch.dtype) -> None:
        q = unpack_rows(self.qweight, self.bits)  # [K, N] in 0..255
        zeros = unpack_cols(self.qzeros, self.bits).long() + 1  # [G, N] in 1..256
        if self._one_group_per_row():
            slices, perm = [(0, self.in_features, 0)], None
        else:
            g = effective_group_size(self.in_features, self.group_size)
            order = _group_order(self.g_idx, self.in_features, self.group_size)
            perm = None if order is True else order
            if perm is not None:
                q = q[perm]
            slices = [(k0, k0 + g, k0 // g) for k0 in range(0, self.in_features, g)]
        packed = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the quantized-tensor API warns that it is deprecated
            for k0, k1, grp in slices:
                # qint8 holds q - 128 with zero point z - 128; the dequantized weight is unchanged.
                codes = (q[k0:k1].t() - 128).to(torch.int8).contiguous()
                qt = torch._make_per_channel_quantized_tensor(codes, self.scales[grp].double(), zeros[grp] - 128, 0)
                packed.append(torch.ops.quantized.linear_prepack(qt, None))
        self._runtime = {"packed": packed, "slices": [(k0, k1) for k0, k1, _ in slices], "perm": perm,
                         "reduce_range": not _has_vnni(), "bias": self.bias.float()}

    def _build_qwen_kernels(self, device: torch.device, dtype: torch.dtype) -> None:
        """qwen/kernels' QuantizedRows: the int16 matrix-vector kernel for few rows, dequantized panels and
        the GEMM library for many. It keeps its own copy of the codes, in the row-tiled order it streams
        fastest; qweight is released afterwards (see _release_codes)."""
        from .. import kernels

        order = _group_order(self.g_idx, self.in_features, self.group_size)
        assert order is not None
        q = unpack_rows(self._official_qweight(), self.bits)  # [K, N]
        perm = None if order is True else order
        if perm is not None:
            q = q[perm]
        scales = self.scales.float()
        zeros = (unpack_cols(self.qzeros, self.bits) + 1).float()
        self._runtime = {"gemv": kernels.QuantizedRows(q.t(), scales.t(), zeros.t(), self.bits, self.bias.float()),
                         "gemv_perm": perm}
        self.decode_kernel = f"gemv-int{self.bits}"

    def _build_int8_rowwise(self, device: torch.device, dtype: torch.dtype) -> None:
        # Opt-in and lossy: the dequantized weight is re-rounded to symmetric int8 with one scale per
        # output row, so grouped checkpoints (the official Int8 has g = 128) run as a single fbgemm
        # call instead of one call per group. The official codes stay as they are (for saving).
        w = self.dequantized_weight(torch.float32)
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        del w
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the quantized-tensor API warns that it is deprecated
            qt = torch._make_per_channel_quantized_tensor(codes, scale.double(),
                                                          torch.zeros(self.out_features, dtype=torch.long), 0)
            packed = torch.ops.quantized.linear_prepack(qt, None)
        self._runtime = {"packed": [packed], "slices": [(0, self.in_features)], "perm": None,
                         "reduce_range": not _has_vnni(), "bias": self.bias.float()}

    def decode_rows(self) -> tuple[Any, torch.Tensor | None] | None:
        """(QuantizedRows, input permutation or None) when this layer's fp32 CPU decode runs on qwen.kernels.

        None until the layer has been prepared for fp32 CPU inputs (its first forward does that).
        Used by the fused decode step (qwen/kernels/decode.py), which calls the same kernel.
        """
        if self._prepared_for != ("cpu", None, torch.float32, self._requested_kernel):
            return None
        rows = self._runtime.get("gemv")
        return None if rows is None else (rows, self._runtime["gemv_perm"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device.type, x.device.index, x.dtype, self._requested_kernel)
        if self._prepared_for != key:
            self.prepare(x.device, x.dtype)
        if self.kernel == "triton":
            # A custom operator with its own autograd formula (input gradient from the same codes), so
            # torch.compile sees one op per layer, in training too.
            return self._runtime["weight"].matmul(x)
        if x.requires_grad and torch.is_grad_enabled():
            # Training through a frozen quantized layer (Q-LoRA): the CPU kernels have no autograd
            # formula, so the kernel runs inside a Function whose backward dequantizes on the fly.
            return _QuantLinearFunction.apply(x, self)
        return self._forward_kernel(x)

    def _forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "qwen-kernels":
            perm = self._runtime["gemv_perm"]
            return self._runtime["gemv"](x if perm is None else x.index_select(-1, perm))
        if self.kernel == "int4-tinygemm":
            return self._forward_int4_tinygemm(x)
        if self.kernel == "triton":
            return self._runtime["weight"].matmul(x)
        if self.kernel == "tinygemm-cuda":
            return self._forward_tinygemm_cuda(x)
        if self.kernel in ("int8-fbgemm", "int8-rowwise"):
            return self._forward_int8_fbgemm(x)
        return self._forward_dequant(x)

    def _forward_int4_tinygemm(self, x: torch.Tensor) -> torch.Tensor:
        rt = self._runtime
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if rt["perm"] is not None:
            x2 = x2.index_select(1, rt["perm"])
        # bf16 in and out: this kernel's fp32 variant is ~30x slower than its bf16 one on AVX-512 CPUs.
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), rt["packed"],
                                                       rt["tile"], rt["scales_zeros"])
        return (y.to(x.dtype) + rt["bias"]).reshape(*shape[:-1], self.out_features)

    def _forward_tinygemm_cuda(self, x: torch.Tensor) -> torch.Tensor:
        rt = self._runtime
        x2 = x.reshape(-1, self.in_features)
        if rt["perm"] is not None:
            x2 = x2.index_select(1, rt["perm"])
        y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), rt["packed"], rt["tile"],
                                               rt["scales_zeros"])
        return (y.to(x.dtype) + rt["bias"]).reshape(*x.shape[:-1], self.out_features)

    def _forward_int8_fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        rt = self._runtime
        x2 = x.reshape(-1, self.in_features).float()
        if rt["perm"] is not None:
            x2 = x2.index_select(1, rt["perm"])
        # One fbgemm call per group (each with its own per-channel scales; a single call when the layer
        # has one group per row). Each call quantizes its slice of the activations to 8 bits.
        y = None
        for (k0, k1), packed in zip(rt["slices"], rt["packed"]):
            part = torch.ops.quantized.linear_dynamic(x2[:, k0:k1].contiguous(), packed, rt["reduce_range"])
            y = part if y is None else y.add_(part)
        assert y is not None
        return (y + rt["bias"]).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _forward_dequant(self, x: torch.Tensor) -> torch.Tensor:
        n = self.out_features
        x2 = x.reshape(-1, self.in_features)
        y = torch.zeros(x2.shape[0], n, dtype=x.dtype, device=x.device)
        for k0, k1, w_t in self._weight_t_chunks(x.dtype, self.qweight):
            y.addmm_(x2[:, k0:k1], w_t)
        y += self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], n)

    def _weight_t_chunks(self, dtype: torch.dtype, qweight: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(k0, k1, W^T[k0:k1]) in ``dtype``, a few MB of float weights at a time, for consecutive input rows."""
        per = 32 // self.bits
        k_total, n = self.in_features, self.out_features
        if self._natural_groups():
            # Groups of g consecutive inputs: broadcast each group's zeros and scales, no gathers.
            g = effective_group_size(k_total, self.group_size)
            step = max(1, _DEQUANT_CHUNK_ELEMENTS // max(n * g, 1))
            groups = k_total // g
            for g0 in range(0, groups, step):
                g1 = min(g0 + step, groups)
                k0, k1 = g0 * g, g1 * g
                q = unpack_rows(qweight[k0 // per : k1 // per], self.bits).view(g1 - g0, g, n)
                zeros = (unpack_cols(self.qzeros[g0:g1], self.bits) + 1)[:, None, :]
                yield k0, k1, ((q - zeros).to(dtype) * self.scales[g0:g1, None, :].to(dtype)).view(k1 - k0, n)
            return
        rows = max(per, (_DEQUANT_CHUNK_ELEMENTS // max(n, 1)) // per * per)
        g_idx = self.g_idx.long()
        for k0 in range(0, k_total, rows):
            k1 = min(k0 + rows, k_total)
            q = unpack_rows(qweight[k0 // per : k1 // per], self.bits)  # [k1-k0, N]
            # Gather per input row: works for any g_idx, permuted (act-order) or not.
            uniq, inverse = torch.unique(g_idx[k0:k1], return_inverse=True)
            zeros = unpack_cols(self.qzeros.index_select(0, uniq), self.bits) + 1
            scales = self.scales.index_select(0, uniq).to(dtype)
            yield k0, k1, (q - zeros[inverse]).to(dtype) * scales[inverse]

    def _natural_groups(self) -> bool:
        """Whole groups of consecutive inputs that start on word boundaries (dequantized by broadcasting)."""
        natural = self._runtime.get("natural_groups")
        if natural is None:
            g = effective_group_size(self.in_features, self.group_size)
            natural = (self.in_features % g == 0 and g % (32 // self.bits) == 0
                       and _group_order(self.g_idx, self.in_features, self.group_size) is True)
            self._runtime["natural_groups"] = natural
        return natural

    def _grad_input(self, grad_y: torch.Tensor) -> torch.Tensor:
        """dL/dx = dL/dy @ W with the exact dequantized W, built a slice of input rows at a time.

        Whatever kernel ran the forward (int4 tinygemm rounds to bf16, int8 fbgemm quantizes the
        activations), the backward uses the weight the codes stand for: the kernels' rounding is
        treated as noise, as QLoRA-style training does with its quantized forward."""
        if self.kernel == "triton":
            return self._runtime["weight"].grad_input(grad_y)
        gy = grad_y.reshape(-1, self.out_features)
        if self.kernel == "qwen-kernels" and gy.dtype == torch.float32:
            return self._grad_input_rows(gy).reshape(*grad_y.shape[:-1], self.in_features)
        gx = torch.empty(gy.shape[0], self.in_features, dtype=gy.dtype, device=gy.device)
        for k0, k1, w_t in self._weight_t_chunks(gy.dtype, self._official_qweight()):
            gx[:, k0:k1] = gy @ w_t.t()
        return gx.reshape(*grad_y.shape[:-1], self.in_features)

    def _grad_input_rows(self, gy: torch.Tensor) -> torch.Tensor:
        """dL/dx from our kernels' codes: exact fp32 panels of W (in group order) rebuilt in C."""
        rows, perm = self._runtime["gemv"], self._runtime["gemv_perm"]
        gx = torch.zeros(gy.shape[0], self.in_features, dtype=torch.float32)
        for n0, n1, w in rows.panels(torch.float32):
            gx.addmm_(gy[:, n0:n1], w)
        if perm is not None:
            gx = gx.index_select(1, torch.argsort(perm))
        return gx

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, kernel={self.kernel or 'not chosen yet'}")


class _QuantLinearFunction(torch.autograd.Function):
    """y = layer(x) by the layer's kernel; dx from the dequantized weight. The codes, scales and bias are
    frozen buffers (no gradient), and nothing is saved for the backward but the layer itself, so training
    through the layer costs no float copy of its weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer._forward_kernel(x)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return ctx.layer._grad_input(grad_y.contiguous()), None


def _tinygemm_group(in_features: int, group_size: int) -> int | None:
    """The tinygemm group (32..256) whose repetition gives the layer's groups exactly, or None."""
    g = effective_group_size(in_features, group_size)
    if in_features % g:
        return None
    for tile in _TINYGEMM_GROUPS:
        if g % tile == 0:
            return tile
    return None


def _group_order(g_idx: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor | bool | None:
    """True when g_idx is k // g; a permutation that sorts the inputs into whole groups; else None."""
    g = effective_group_size(in_features, group_size)
    natural = torch.arange(in_features, device=g_idx.device) // g
    gi = g_idx.long()
    if torch.equal(gi, natural):
        return True
    perm = torch.argsort(gi, stable=True)
    if torch.equal(gi[perm], natural):
        return perm
    return None


@functools.lru_cache(maxsize=1)
def _fbgemm_available() -> bool:
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm")) and hasattr(
        torch.ops.quantized, "linear_dynamic")


@functools.lru_cache(maxsize=1)
def _has_vnni() -> bool:
    # Without VNNI, fbgemm multiplies u8 x s8 pairs into int16 with saturation, so activations must
    # use 7 bits (reduce_range) to stay exact in the accumulation.
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or os.environ.get("QWEN_ASSUME_VNNI") == "1"


def quant_linear_layers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]


def prepare_quant_layers(model: nn.Module, dtype: torch.dtype | None = None, kernel: str = "auto") -> dict[str, int]:
    """Build every QuantLinear's kernel now (instead of at the first forward); returns {kernel: layer count}."""
    counts: dict[str, int] = {}
    for _name, layer in quant_linear_layers(model):
        name = layer.prepare(layer.qweight.device, dtype or torch.float32, kernel)
        counts[name] = counts.get(name, 0) + 1
    if counts:
        logger.info("quantized layers by kernel: %s", counts)
    return counts


def dequantize_layer_to_linear(layer: QuantLinear, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """An nn.Linear with the layer's dequantized weight (and its bias)."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=True, device="meta")
    linear.weight = nn.Parameter(layer.dequantized_weight(dtype), requires_grad=False)
    linear.bias = nn.Parameter(layer.bias.to(dtype), requires_grad=False)
    return linear


__all__ = ["QuantLinear", "KERNELS", "quant_linear_layers", "prepare_quant_layers", "dequantize_layer_to_linear"]
