"""The KV cache: one preallocated object per generation, not tuples grown by torch.cat.

Layout per layer: keys and values [B, n_heads, capacity, head_dim], keys stored after RoPE
(spec §4.7). Slots are shared by all rows (slot t of every row is written by the same
forward call); per-row state says which slots hold real tokens (``key_mask``), which
RoPE position the row's next real token takes (``next_position``; left padding does not
shift it, unlike the official code) and which dynamic-NTK alpha the row chose at prefill.

`generate` allocates the cache for prompt + max_new_tokens, so decoding never reallocates.
A cache made implicitly by ``model(ids, use_cache=True)`` grows by doubling when full.

KV-cache int8 (``use_cache_quantization=True``, spec §5; docs/quantization.md): the caches then hold
uint8 keys/values plus a scale and a zero-point per (row, head, slot), and ``update`` returns the
dequantized K/V for attention. :class:`KVQuantizer` holds the two modes: ``official`` (the spec's
quantizer bit for bit: one scale per chunk, truncation) and ``round`` (per-token scales, round to
nearest, fp32 parameters, no NaN on constant input).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

CACHE_QUANTIZATION_MODES = ("official", "round")
_QMIN, _QMAX = 0, 255  # uint8 range (spec §5.1)


# ---------------------------------------------------------------------------------------------- int8
def quantize_cache_official(
    x: torch.Tensor, qmin: torch.Tensor, qmax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official quantizer (spec §5.1), operation for operation: x [B, h, T, d] -> (q, scale, zero).

    One scale/zero per (batch, head) over the whole chunk (T*d values); zero is not rounded; q is
    truncated (not rounded) to uint8. scale and zero come back as [B, h, T, 1] (repeated over T).
    The arithmetic runs in x's dtype: the 0-d ``qmin``/``qmax`` never promote it, whatever their dtype.
    A constant chunk divides by zero (NaN), as in the official code.
    """
    flat = torch.flatten(x, 2)
    fmax = torch.amax(flat, dim=-1, keepdim=True)
    fmin = torch.amin(flat, dim=-1, keepdim=True)
    qmax, qmin = qmax.to(x.device), qmin.to(x.device)
    scale = (fmax - fmin) / (qmax - qmin)
    zero = qmin - fmin / scale
    t = x.shape[2]
    scale = scale.unsqueeze(-1).expand(-1, -1, t, 1)
    zero = zero.unsqueeze(-1).expand(-1, -1, t, 1)
    q = torch.clamp(x / scale + zero, qmin, qmax).to(torch.uint8)  # float -> uint8 truncates
    return q, scale, zero


def quantize_cache_round(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The accurate quantizer: x [B, h, T, d] -> (q, scale, zero), each token on its own scale.

    Differences from :func:`quantize_cache_official`, all for accuracy: min/max per (batch, head,
    token) instead of per chunk (one outlier token no longer coarsens the whole prompt, and pads of a
    batch row do not touch its real tokens); fp32 arithmetic and fp32 scale/zero whatever the model
    dtype (a bf16 zero-point alone is off by up to half a step); round to nearest instead of
    truncation (no systematic downward bias); a constant token gets scale 1 so it dequantizes
    exactly instead of dividing by zero. Same storage layout and dequantization formula.
    """
    xf = x.float()
    fmin = xf.amin(dim=-1, keepdim=True)
    fmax = xf.amax(dim=-1, keepdim=True)
    scale = (fmax - fmin) / (_QMAX - _QMIN)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant (or underflowing) span
    zero = _QMIN - fmin / scale
    # (x - fmin) / scale stays in [0, 255] even when x/scale alone would overflow.
    q = torch.round((xf - fmin) / scale).clamp_(_QMIN, _QMAX).to(torch.uint8)
    return q, scale, zero


def dequantize_cache(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x = scale * (q - zero) (spec §5.1), in the dtype of scale/zero."""
    return scale * (q - zero)


_kernel_warned = False


class KVQuantizer:
    """How a cache turns a new K or V chunk [B, h, T, d] into (uint8, scale, zero) and back.

    ``dtype`` is the activation dtype: what :meth:`dequantize` returns. In ``official`` mode qmin/qmax
    are 0-d tensors of the dtype the official code picks from config.bf16/fp16 (spec §5.1) and
    scale/zero are kept in the dtype the official arithmetic yields (the activation dtype); in
    ``round`` mode scale/zero are fp32.
    """

    def __init__(self, mode: str = "round", dtype: torch.dtype = torch.float32,
                 qdtype: torch.dtype = torch.float32) -> None:
        if mode not in CACHE_QUANTIZATION_MODES:
            raise ValueError(f"cache quantization mode must be one of {CACHE_QUANTIZATION_MODES}, got {mode!r}")
        self.mode, self.dtype = mode, dtype
        self.qmin = torch.tensor(_QMIN, dtype=qdtype)
        self.qmax = torch.tensor(_QMAX, dtype=qdtype)
        if mode == "official":  # the dtype scale/zero take under torch's promotion of the official ops
            self.param_dtype = (torch.ones(1, dtype=dtype) / (self.qmax - self.qmin)).dtype
        else:
            self.param_dtype = torch.float32

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype) -> "KVQuantizer | None":
        """The quantizer a model with ``config`` uses (None when use_cache_quantization is off)."""
        if not getattr(config, "use_cache_quantization", False):
            return None
        global _kernel_warned
        if getattr(config, "use_cache_kernel", False) and not _kernel_warned:
            _kernel_warned = True
            warnings.warn("use_cache_kernel=True: the official CUDA kernel is not built by this package; the int8 "
                          "cache is dequantized with torch ops instead (same formula)", stacklevel=3)
        qdtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32
        return cls(getattr(config, "cache_quantization_mode", "round"), dtype, qdtype)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.mode == "official":
            return quantize_cache_official(x, self.qmin, self.qmax)
        return quantize_cache_round(x)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """:func:`dequantize_cache` with one buffer instead of three (it runs over the whole cache each step).

        Bit-identical: uint8 -> float is exact, and the same two roundings (sub, then mul) happen.
        """
        out = q.to(self.param_dtype)
        out.sub_(zero).mul_(scale)
        return out.to(self.dtype)

    def __repr__(self) -> str:
        return f"KVQuantizer(mode={self.mode!r}, dtype={self.dtype}, param_dtype={self.param_dtype})"


def _grow(store: list[torch.Tensor], new_cap: int, keep: int) -> None:
    """Reallocate every layer of ``store`` to ``new_cap`` slots, keeping the first ``keep``."""
    for i, old in enumerate(store):
        new = old.new_zeros(old.shape[0], old.shape[1], new_cap, old.shape[3])
        new[:, :, :keep] = old[:, :, :keep]
        store[i] = new


class KVCache:
    """Preallocated key/value storage plus the per-sequence state of one batch.

    With a ``quantizer`` (KV-cache int8), ``keys``/``values`` hold uint8 and ``key_scales``,
    ``key_zeros``, ``value_scales``, ``value_zeros`` hold [B, h, capacity, 1] per layer; ``dtype``
    stays the activation dtype, the dtype of the K/V that :meth:`update` returns.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | Sequence[torch.device | str] = "cpu",
        quantizer: KVQuantizer | None = None,
    ) -> None:
        devices = list(device) if isinstance(device, (list, tuple)) else [device] * num_layers
        if len(devices) != num_layers:
            raise ValueError(f"got {len(devices)} devices for {num_layers} layers")
        self.num_layers, self.batch_size = num_layers, batch_size
        self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
        self.devices = [torch.device(d) for d in devices]
        self.quantizer = quantizer
        capacity = max(int(capacity), 1)
        shape = (batch_size, num_heads, capacity, head_dim)
        store_dtype = torch.uint8 if quantizer is not None else dtype
        self.keys = [torch.zeros(shape, dtype=store_dtype, device=d) for d in self.devices]
        self.values = [torch.zeros(shape, dtype=store_dtype, device=d) for d in self.devices]
        self.key_scales, self.key_zeros, self.value_scales, self.value_zeros = _quant_params(
            quantizer, (batch_size, num_heads, capacity, 1), self.devices)
        self.length = 0  # slots filled (same for every row)
        self.key_mask = torch.ones(batch_size, capacity, dtype=torch.bool, device=self.devices[0])
        self.padded = False  # True once any slot is a pad: masks are needed
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=self.devices[0])
        self.ntk_alpha: list[float] | None = None  # chosen at prefill, kept (spec §4.4)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, capacity: int) -> "KVCache":
        """A cache shaped for ``model`` (a QWenLMHeadModel), placed on each layer's device.

        int8 when the model's config has ``use_cache_quantization`` (mode: ``cache_quantization_mode``).
        """
        cfg = model.config
        blocks = model.transformer.h
        devices = [b.ln_1.weight.device for b in blocks]
        dtype = model.transformer.ln_f.weight.dtype  # the activation dtype, whatever the linear layers hold
        return cls(cfg.num_hidden_layers, batch_size, cfg.num_attention_heads, cfg.head_dim, capacity, dtype, devices,
                   quantizer=KVQuantizer.from_config(cfg, dtype))

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def _stores(self) -> list[list[torch.Tensor]]:
        """Every per-layer tensor list indexed [row, head, slot, :] (K/V, and scales/zeros when int8)."""
        return [self.keys, self.values, self.key_scales, self.key_zeros, self.value_scales, self.value_zeros]

    # Read access like the official tuple-of-layers: len() is the layer count and cache[i] is layer i's
    # (K, V) as [B, S, heads, head_dim] views (sequence on dim 1, keys after RoPE), so code written
    # against the official past_key_values keeps working. cache.length is the number of filled slots.
    # An int8 cache reads like the official quantized one instead: cache[i] is
    # ((qK, K_scale, K_zero), (qV, V_scale, V_zero)), [B, heads, S, head_dim | 1] (spec §5.2).
    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, layer: int) -> tuple[Any, Any]:
        if not -self.num_layers <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for a {self.num_layers}-layer cache")
        n = self.length
        if self.quantizer is not None:
            return ((self.keys[layer][:, :, :n], self.key_scales[layer][:, :, :n], self.key_zeros[layer][:, :, :n]),
                    (self.values[layer][:, :, :n], self.value_scales[layer][:, :, :n],
                     self.value_zeros[layer][:, :, :n]))
        return self.keys[layer][:, :, :n].transpose(1, 2), self.values[layer][:, :, :n].transpose(1, 2)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (self[i] for i in range(self.num_layers))

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more slots, doubling the capacity if needed."""
        need = self.length + extra
        if need <= self.capacity:
            return
        new_cap = max(need, 2 * self.capacity)
        for store in self._stores():
            _grow(store, new_cap, self.length)
        mask = self.key_mask.new_ones(self.batch_size, new_cap)
        mask[:, : self.length] = self.key_mask[:, : self.length]
        self.key_mask = mask

    def begin(self, new_mask: torch.Tensor | None, num_new: int) -> None:
        """Record the validity of the ``num_new`` slots about to be written (before the layers run)."""
        self.reserve(num_new)
        if new_mask is not None:
            new_mask = new_mask.to(device=self.key_mask.device, dtype=torch.bool)
            self.key_mask[:, self.length : self.length + num_new] = new_mask
            if not self.padded and not bool(new_mask.all()):
                self.padded = True

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, h, T, d] at the current slots; return views of all filled slots.

        An int8 cache quantizes k and v (each as one chunk, spec §5.1) and returns the dequantized
        K/V of all filled slots, the new ones included, as the official code attends over.
        """
        t = k.shape[2]
        end = self.length + t
        if self.quantizer is not None:
            return self._update_quantized(layer, k, v, end)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def _update_quantized(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                          end: int) -> tuple[torch.Tensor, torch.Tensor]:
        qz, start = self.quantizer, self.length
        assert qz is not None
        out = []
        for x, q, scale, zero in ((k, self.keys, self.key_scales, self.key_zeros),
                                  (v, self.values, self.value_scales, self.value_zeros)):
            xq, xs, xz = qz.quantize(x)
            q[layer][:, :, start:end] = xq
            scale[layer][:, :, start:end] = xs
            zero[layer][:, :, start:end] = xz
            out.append(qz.dequantize(q[layer][:, :, :end], scale[layer][:, :, :end], zero[layer][:, :, :end]))
        return out[0], out[1]

    def commit(self, num_new: int, new_positions_taken: torch.Tensor) -> None:
        """Advance after all layers ran: ``num_new`` slots, and per-row count of real tokens added."""
        self.length += num_new
        self.next_position += new_positions_taken.to(self.next_position.device)

    # ------------------------------------------------------------------ manipulation
    def select_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only the given batch rows (e.g. drop finished sequences, or reorder for beams)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        for store in self._stores():
            for i, t in enumerate(store):
                store[i] = t.index_select(0, idx.to(t.device))
        self.key_mask = self.key_mask.index_select(0, idx.to(self.key_mask.device))
        self.next_position = self.next_position.index_select(0, idx.to(self.next_position.device))
        if self.ntk_alpha is not None:
            self.ntk_alpha = [self.ntk_alpha[int(j)] for j in idx.tolist()]
        self.batch_size = len(idx)

    def crop(self, length: int) -> None:
        """Forget everything after the first ``length`` slots (rewind a sequence; unpadded caches only)."""
        if length > self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        removed = self.key_mask[:, length : self.length].sum(dim=1)
        self.next_position -= removed
        self.key_mask[:, length:] = True
        self.length = length

    def nbytes(self) -> int:
        """Bytes of the K/V storage (int8 values, scales and zeros included), at the current capacity."""
        return sum(t.numel() * t.element_size() for store in self._stores() for t in store)

    # ------------------------------------------------------------------ official tuple format
    def to_legacy(self) -> tuple[tuple[Any, Any], ...]:
        """The official ``past_key_values`` layout: per layer (K, V) as [B, S, h, d] (spec §4.7).

        For an int8 cache the official quantized layout (spec §5.2), lossless: per layer
        ((qK, K_scale, K_zero), (qV, V_scale, V_zero)) with the sequence on dim 2.
        """
        return tuple(self[i] for i in range(self.num_layers))

    @classmethod
    def from_legacy(cls, past: Sequence[Sequence[Any]], extra_capacity: int = 0,
                    quantizer: KVQuantizer | None = None) -> "KVCache":
        """Build a cache from official-layout tuples ([B, S, h, d] per tensor, keys post-RoPE).

        Also takes the official int8 layout (needs ``quantizer``, the model's). Float tuples given
        with a ``quantizer`` are quantized as one chunk per layer, as a prefill would be.
        """
        first = past[0][0]
        if isinstance(first, (tuple, list)):  # ((qK, K_scale, K_zero), (qV, V_scale, V_zero)) per layer
            if quantizer is None:
                raise ValueError("past_key_values in the int8 layout ((qK, scale, zero), (qV, scale, zero)) need a "
                                 "model loaded with use_cache_quantization=True")
            if first[0].dim() != 4 or first[0].dtype != torch.uint8:
                raise ValueError(f"int8 past_key_values must hold uint8 [B, heads, S, head_dim] tensors, got "
                                 f"{first[0].dtype} {tuple(first[0].shape)}")
            b, h, s, d = first[0].shape
            cache = cls(len(past), b, h, d, s + extra_capacity, quantizer.dtype, [kv[0][0].device for kv in past],
                        quantizer=quantizer)
            for i, (kq, vq) in enumerate(past):
                for src, stores in ((kq, (cache.keys, cache.key_scales, cache.key_zeros)),
                                    (vq, (cache.values, cache.value_scales, cache.value_zeros))):
                    for tensor, store in zip(src, stores):
                        store[i][:, :, :s] = tensor
        else:
            if first.dim() != 4:
                raise ValueError(
                    f"past_key_values tensors must be [B, S, heads, head_dim], got shape {tuple(first.shape)}")
            b, s, h, d = first.shape
            dtype = quantizer.dtype if quantizer is not None else first.dtype
            cache = cls(len(past), b, h, d, s + extra_capacity, dtype, [kv[0].device for kv in past],
                        quantizer=quantizer)
            for i, (k, v) in enumerate(past):
                cache.update(i, k.transpose(1, 2), v.transpose(1, 2))
        cache.length = s
        cache.next_position.fill_(s)
        return cache


def _quant_params(quantizer: KVQuantizer | None, shape: tuple[int, ...],
                  devices: list[torch.device]) -> tuple[list[torch.Tensor], ...]:
    """Per-layer zero-filled scale/zero storage for keys and values (four empty lists without int8).

    Zero scales and zeros dequantize never-written slots to 0, a finite value, so a masked slot
    cannot leak NaN into attention (0 * NaN would).
    """
    if quantizer is None:
        return [], [], [], []
    return tuple([torch.zeros(shape, dtype=quantizer.param_dtype, device=d) for d in devices]
                 for _ in range(4))  # type: ignore[return-value]


def _storage_kind(quantizer: KVQuantizer | None) -> tuple[str, torch.dtype] | None:
    return None if quantizer is None else (quantizer.mode, quantizer.param_dtype)


class RowKVCache:
    """Continuous-batching storage: batch row r holds one sequence at its own length.

    Unlike :class:`KVCache` (one shared slot counter, padding for ragged rows), every row writes its
    next key at its own length, so a sequence can join a running batch at any step and leave it
    without touching the others. Active sequences occupy rows ``0 .. rows-1``; a leaving sequence is
    replaced by the last row (one row copy), so the decode step always runs on a contiguous slice.
    Sequences enter prefilled (:meth:`insert` copies a one-row :class:`KVCache`); the model then
    runs single-token decode steps on the active rows. The capacity doubles when a row needs more
    room, so memory follows the longest live sequence instead of the worst case.
    With ``use_cache_quantization`` the storage is int8 like :class:`KVCache`'s; each row's decode
    token is quantized on its own (per row and head), as a one-sequence decode step would be.
    """

    padded = True  # rows differ in length: attention always needs a mask

    def __init__(self, model: torch.nn.Module, max_rows: int, capacity: int = 256) -> None:
        cfg = model.config
        self.devices = [b.ln_1.weight.device for b in model.transformer.h]
        self.dtype = model.transformer.ln_f.weight.dtype
        self.quantizer = KVQuantizer.from_config(cfg, self.dtype)
        self.num_layers, self.max_rows = cfg.num_hidden_layers, max_rows
        shape = (max_rows, cfg.num_attention_heads, max(1, capacity), cfg.head_dim)
        store_dtype = torch.uint8 if self.quantizer is not None else self.dtype
        self.keys = [torch.zeros(shape, dtype=store_dtype, device=d) for d in self.devices]
        self.values = [torch.zeros(shape, dtype=store_dtype, device=d) for d in self.devices]
        self.key_scales, self.key_zeros, self.value_scales, self.value_zeros = _quant_params(
            self.quantizer, shape[:3] + (1,), self.devices)
        self.lengths = torch.zeros(max_rows, dtype=torch.long, device=self.devices[0])
        self.alphas = [1.0] * max_rows
        self.rows = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def _stores(self) -> list[list[torch.Tensor]]:
        return [self.keys, self.values, self.key_scales, self.key_zeros, self.value_scales, self.value_zeros]

    # -- the interface QWenModel.forward uses (decode over the active rows)
    @property
    def length(self) -> int:
        """Slots the attention has to look at: the longest active row."""
        return int(self.lengths[: self.rows].max()) if self.rows else 0

    @property
    def next_position(self) -> torch.Tensor:
        return self.lengths[: self.rows]

    @property
    def ntk_alpha(self) -> list[float]:
        return self.alphas[: self.rows]

    def begin(self, new_mask: torch.Tensor | None, num_new: int) -> None:
        if num_new != 1 or new_mask is not None:
            raise ValueError("a RowKVCache takes one unpadded token per row (decode); prefill into a KVCache")
        self.reserve(self.length + 1)
        self._span = self.length + 1

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(self.rows, device=k.device)
        at = self.lengths[: self.rows].to(k.device)
        if self.quantizer is not None:
            return self._update_quantized(layer, k, v, rows, at)
        self.keys[layer][rows, :, at] = k[:, :, 0]
        self.values[layer][rows, :, at] = v[:, :, 0]
        return self.keys[layer][: self.rows, :, : self._span], self.values[layer][: self.rows, :, : self._span]

    def _update_quantized(self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                          at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qz, n, span = self.quantizer, self.rows, self._span
        assert qz is not None
        out = []
        for x, q, scale, zero in ((k, self.keys, self.key_scales, self.key_zeros),
                                  (v, self.values, self.value_scales, self.value_zeros)):
            xq, xs, xz = qz.quantize(x)  # x [rows, h, 1, d]: one chunk per row and head
            q[layer][rows, :, at] = xq[:, :, 0]
            scale[layer][rows, :, at] = xs[:, :, 0]
            zero[layer][rows, :, at] = xz[:, :, 0]
            out.append(qz.dequantize(q[layer][:n, :, :span], scale[layer][:n, :, :span], zero[layer][:n, :, :span]))
        return out[0], out[1]

    def attention_mask(self, device: torch.device) -> torch.Tensor:
        """[rows, 1, 1, span] boolean: row r sees its own slots 0..lengths[r] (the new token included)."""
        slots = torch.arange(self._span, device=device)
        return (slots[None, :] <= self.lengths[: self.rows].to(device)[:, None])[:, None, None, :]

    def commit(self, num_new: int, new_positions_taken: torch.Tensor) -> None:
        self.lengths[: self.rows] += 1

    # -- row management
    def reserve(self, need: int) -> None:
        if need <= self.capacity:
            return
        new_cap = max(need, 2 * self.capacity)
        keep = self.capacity
        for store in self._stores():
            _grow(store, new_cap, keep)

    def insert(self, prefilled: KVCache, index: int = 0) -> int:
        """Append row ``index`` of a prefilled cache as a new active row; returns its row index.

        The prefilled cache may be a left-padded batch (one batched prefill for several requests): the
        row's real slots, which sit at the end, move to slots 0..n-1. RoPE was applied by position, not
        by slot, so moving keys between slots changes nothing.
        """
        if self.rows >= self.max_rows:
            raise RuntimeError(f"all {self.max_rows} rows are in use")
        if not 0 <= index < prefilled.batch_size:
            raise IndexError(f"row {index} is not in a prefilled cache of {prefilled.batch_size} rows")
        if _storage_kind(self.quantizer) != _storage_kind(prefilled.quantizer):
            raise ValueError(
                f"cannot insert a cache with quantizer {prefilled.quantizer} into one with {self.quantizer}")
        total = prefilled.length
        first = 0
        if prefilled.padded:
            valid = prefilled.key_mask[index, :total]
            first = total - int(valid.sum())
            if not bool(valid[first:].all()):
                raise ValueError("insert takes a left-padded prefill (pads first, then the row's tokens)")
            if first and prefilled.quantizer is not None and prefilled.quantizer.mode == "official":
                # The official quantizer scales each prefill as one chunk, pads included: such a row
                # would not equal its own unpadded prefill.
                raise ValueError("an official-mode int8 cache must be prefilled one unpadded row at a time")
        n = total - first
        self.reserve(n + 1)
        row = self.rows
        for dst_store, src_store in zip(self._stores(), prefilled._stores()):  # scale/zero lists are empty without int8
            for dst, src in zip(dst_store, src_store):
                dst[row, :, :n] = src[index, :, first:total]
        self.lengths[row] = int(prefilled.next_position[index])
        alphas = prefilled.ntk_alpha or [1.0]
        self.alphas[row] = alphas[index] if len(alphas) > 1 else alphas[0]
        self.rows += 1
        return row

    def remove(self, row: int) -> int | None:
        """Free ``row``; the last active row moves into it. Returns the moved row's old index (or None)."""
        last = self.rows - 1
        if not 0 <= row <= last:
            raise IndexError(f"row {row} is not active ({self.rows} rows)")
        moved = None
        if row != last:
            n = int(self.lengths[last])
            for store in self._stores():
                for t in store:
                    t[row, :, :n] = t[last, :, :n]
            self.lengths[row] = self.lengths[last]
            self.alphas[row] = self.alphas[last]
            moved = last
        self.lengths[last] = 0
        self.rows = last
        return moved

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in self._stores() for t in store)
