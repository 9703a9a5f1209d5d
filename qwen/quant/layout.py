"""The official GPTQ checkpoint layout: AutoGPTQ's "cuda-old" (v1) tensors and the quantize config (spec §10).

For a linear layer with K inputs and N outputs quantized to ``bits`` with groups of ``g`` inputs
(``per = 32 // bits`` values per int32 word, ``G = ceil(K / g)`` groups, ``g = K`` when group_size is -1):

=========  =======  ===============  ============================================================
tensor     dtype    shape            content
=========  =======  ===============  ============================================================
qweight    int32    [K / per, N]     q[k, n] in word k // per of column n, at bit bits * (k % per)
qzeros     int32    [G, N / per]     (zero - 1)[g, n] in word n // per of row g, bit bits * (n % per)
scales     float16  [G, N]           one scale per (group, output)
g_idx      int32    [K]              the group of each input k (k // g unless act-order permuted it)
bias       float16  [N]              always present; zeros for layers that have none
=========  =======  ===============  ============================================================

and W[n, k] = scales[g_idx[k], n] * (q[k, n] - (qzeros_value[g_idx[k], n] + 1)). The low bits of a
word hold the lowest index. The "minus one" on the zeros is an AutoGPTQ convention that every
consumer of the format (AutoGPTQ, optimum, vLLM, exllama) undoes; a symmetric 4-bit checkpoint
therefore stores zero 8 as 7, i.e. 0x77777777 words.

Only 2, 4 and 8 bits are supported: they divide 32, so the packing above is exact. AutoGPTQ's
3-bit format packs 32 values into three words with values straddling word boundaries; we reject it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

SUPPORTED_BITS = (2, 4, 8)
QUANTIZE_CONFIG_NAME = "quantize_config.json"
# The linear layers that GPTQ checkpoints of Qwen quantize, per block (spec §10.2); the other
# tensors (wte, lm_head, the norms) stay in floating point.
QUANTIZED_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
# AutoGPTQ's "true sequential" order for Qwen: each group is quantized with inputs computed by the
# already-quantized groups before it.
SEQUENTIAL_GROUPS = (("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",))


class QuantConfigError(ValueError):
    """A quantization config that cannot be used (names the file or argument and the field)."""


@dataclass(frozen=True)
class GPTQConfig:
    """The fields of quantize_config.json (and of config.json's ``quantization_config``, plus quant_method)."""

    bits: int = 4
    group_size: int = 128
    damp_percent: float = 0.01
    desc_act: bool = False
    static_groups: bool = False
    sym: bool = True
    true_sequential: bool = True
    model_name_or_path: str | None = None
    model_file_base_name: str | None = None
    # Keys we do not interpret (e.g. checkpoint_format, meta), kept when writing back.
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        validate_bits(self.bits)
        validate_group_size(self.group_size)
        if not 0 <= float(self.damp_percent) < 1:
            raise QuantConfigError(f"damp_percent must be in [0, 1), got {self.damp_percent}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def num_groups(self, in_features: int) -> int:
        return num_groups(in_features, self.group_size)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "quantization_config") -> "GPTQConfig":
        d = dict(d)
        method = d.pop("quant_method", "gptq")
        if str(method).lower() != "gptq":
            raise QuantConfigError(
                f"{source}: quant_method is {method!r}; only GPTQ checkpoints (quant_method 'gptq') are supported"
            )
        fmt = d.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", None):
            # gptq_v2 stores zeros without the minus one; loading it as v1 would be silently wrong.
            raise QuantConfigError(f"{source}: checkpoint_format {fmt!r} is not supported (only AutoGPTQ v1 'gptq')")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        for key in ("bits", "group_size"):
            if key in known and not isinstance(known[key], int):
                raise QuantConfigError(f"{source}: {key} must be an integer, got {known[key]!r}")
        try:
            return cls(**known, extra=extra)
        except QuantConfigError as e:
            raise QuantConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise QuantConfigError(f"{source}: {e}") from None

    def to_quantize_config(self) -> dict[str, Any]:
        """quantize_config.json, keys in the order of the official files."""
        out = {
            "bits": self.bits,
            "group_size": self.group_size,
            "damp_percent": self.damp_percent,
            "desc_act": self.desc_act,
            "static_groups": self.static_groups,
            "sym": self.sym,
            "true_sequential": self.true_sequential,
            "model_name_or_path": self.model_name_or_path,
            "model_file_base_name": self.model_file_base_name,
        }
        out.update(self.extra)
        return out

    def to_config_entry(self) -> dict[str, Any]:
        """config.json's ``quantization_config``: the same dict plus ``quant_method``."""
        return {**self.to_quantize_config(), "quant_method": "gptq"}


def validate_bits(bits: Any) -> int:
    if bits == 3:
        raise QuantConfigError(
            "bits=3 is not supported: AutoGPTQ packs 3-bit values across word boundaries; use 2, 4 or 8"
        )
    if bits not in SUPPORTED_BITS:
        raise QuantConfigError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def validate_group_size(group_size: Any) -> int:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size < 1 and group_size != -1):
        raise QuantConfigError(f"group_size must be a positive integer or -1 (one group per row), got {group_size!r}")
    return group_size


def num_groups(in_features: int, group_size: int) -> int:
    """Rows of qzeros/scales: ceil(K / g), as AutoGPTQ (a last, shorter group when g does not divide K)."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def effective_group_size(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


def load_quant_config(path: str, config_entry: dict[str, Any] | None) -> GPTQConfig:
    """The GPTQ config of a checkpoint directory: config.json's quantization_config, else quantize_config.json.

    When both exist and disagree on a field that changes the tensors, the error names both files.
    """
    file = os.path.join(path, QUANTIZE_CONFIG_NAME)
    from_file = None
    if os.path.exists(file):
        try:
            with open(file, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise QuantConfigError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise QuantConfigError(f"{file}: expected a JSON object")
        from_file = GPTQConfig.from_dict(raw, source=file)
    if config_entry is None:
        if from_file is None:
            raise QuantConfigError(f"{path}: no quantization_config in config.json and no {QUANTIZE_CONFIG_NAME}")
        return from_file
    cfg = GPTQConfig.from_dict(config_entry, source=os.path.join(path, "config.json") + " quantization_config")
    if from_file is not None:
        for key in ("bits", "group_size", "sym"):
            if getattr(cfg, key) != getattr(from_file, key):
                raise QuantConfigError(
                    f"{path}: config.json quantization_config has {key}={getattr(cfg, key)!r} but "
                    f"{QUANTIZE_CONFIG_NAME} has {key}={getattr(from_file, key)!r}"
                )
    return cfg


# ------------------------------------------------------------------------------------------- packing
def values_per_word(bits: int) -> int:
    return 32 // validate_bits(bits)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] integers in [0, 2^bits) -> int32 [K / per, N], ``per`` consecutive rows per word (qweight)."""
    per = values_per_word(bits)
    rows, cols = values.shape
    if rows % per:
        raise QuantConfigError(f"cannot pack {rows} rows at {bits} bits: the row count must be a multiple of {per}")
    _check_range(values, bits)
    # Work on the transpose: GPTQ codes arrive as q.t() of a contiguous [N, K] tensor, so this is the
    # contiguous orientation. int32 shifts wrap into the sign bit, which is exactly the stored word.
    vt = values.t()
    out = torch.zeros(cols, rows // per, dtype=torch.int32, device=values.device)
    for j in range(per):
        out |= vt[:, j::per].to(torch.int32) << (bits * j)
    return out.t().contiguous()


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 [K / per, N] -> int32 [K, N]."""
    per = values_per_word(bits)
    shifts = (torch.arange(per, dtype=torch.int32, device=packed.device) * bits).view(1, per, 1)
    # >> on int32 is arithmetic, so negative words smear the sign bit; the mask removes it.
    vals = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return vals.reshape(packed.shape[0] * per, packed.shape[1])


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[G, N] integers in [0, 2^bits) -> int32 [G, N / per], ``per`` consecutive columns per word (qzeros)."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_cols: int32 [G, N / per] -> int32 [G, N]."""
    return unpack_rows(packed.t(), bits).t().contiguous()


def _check_range(values: torch.Tensor, bits: int) -> None:
    if values.is_floating_point():
        raise QuantConfigError(f"expected integer values to pack, got {values.dtype}")
    if values.numel():
        lo, hi = (int(v) for v in torch.aminmax(values))
        if lo < 0 or hi > (1 << bits) - 1:
            raise QuantConfigError(
                f"values to pack at {bits} bits must lie in [0, {(1 << bits) - 1}], got [{lo}, {hi}]")


# ------------------------------------------------------------------------------------------- tensors
def pack_gptq_tensors(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The five official tensors of one layer.

    q: [N, K] integer codes (nn.Linear orientation); scales: [G, N]; zeros: [G, N] integer zero
    points in [1, 2^bits] (zero 0 cannot be stored: zero - 1 would be -1); g_idx: [K]; bias: [N] or None.
    """
    n, k = q.shape
    maxq = (1 << bits) - 1
    zeros = zeros.to(torch.int64)
    if zeros.numel() and (int(zeros.min()) < 1 or int(zeros.max()) > maxq + 1):
        raise QuantConfigError(
            f"zero points must lie in [1, {maxq + 1}] to be stored as zero - 1 (got [{int(zeros.min())}, "
            f"{int(zeros.max())}])"
        )
    if scales.shape != zeros.shape or scales.shape[1] != n:
        raise QuantConfigError(f"scales {list(scales.shape)} and zeros {list(zeros.shape)} must both be [G, {n}]")
    if g_idx.shape != (k,):
        raise QuantConfigError(f"g_idx must have shape [{k}], got {list(g_idx.shape)}")
    return {
        "qweight": pack_rows(q.t(), bits),
        "qzeros": pack_cols(zeros - 1, bits),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
        "bias": (torch.zeros(n) if bias is None else bias.detach()).to(torch.float16).contiguous(),
    }


def expected_shapes(in_features: int, out_features: int, bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the official tensors of a K -> N layer (spec §10.3)."""
    per = values_per_word(bits)
    g = num_groups(in_features, group_size)
    return {
        "qweight": (in_features // per, out_features),
        "qzeros": (g, out_features // per),
        "scales": (g, out_features),
        "g_idx": (in_features,),
        "bias": (out_features,),
    }


EXPECTED_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32,
                   "bias": torch.float16}


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The float weight [N, K] (nn.Linear orientation) that the official tensors encode."""
    q = unpack_rows(qweight, bits)  # [K, N]
    zeros = unpack_cols(qzeros, bits) + 1  # [G, N]
    gi = g_idx.long()
    w = (q - zeros[gi]).to(dtype) * scales[gi].to(dtype)
    return w.t().contiguous()


__all__ = [
    "SUPPORTED_BITS", "QUANTIZE_CONFIG_NAME", "QUANTIZED_MODULES", "SEQUENTIAL_GROUPS", "QuantConfigError",
    "GPTQConfig", "validate_bits", "validate_group_size", "num_groups", "effective_group_size",
    "load_quant_config", "values_per_word", "pack_rows", "unpack_rows", "pack_cols", "unpack_cols",
    "pack_gptq_tensors", "expected_shapes", "EXPECTED_DTYPES", "dequantize",
]
