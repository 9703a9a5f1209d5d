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

Window attention (``use_window_attn``, docs/long-context.md): a layer with a window of W tokens only
ever attends to the last W slots, so its storage is a ring of R = min(capacity, W + window_slack)
slots: slot g lives at ring index g mod R, and memory stays bounded however long the sequence. The
slack lets decode write before attending and lets ``crop`` rewind a little; :meth:`KVCache.key_slots`
says which slot each key that :meth:`KVCache.update` returns holds, so the model can build the mask.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

CACHE_QUANTIZATION_MODES = ("official", "round")
# Ring slots a windowed layer keeps beyond its window: chunks of up to WINDOW_SLACK + 1 tokens (decode,
# short appends) are written in place before attention, and crop() can rewind up to WINDOW_SLACK + 1 slots.
WINDOW_SLACK = 64
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


def _grow(store: list[torch.Tensor], new_cap: int, keep: int, layers: Sequence[int] | None = None) -> None:
    """Reallocate every layer (or only ``layers``) of ``store`` to ``new_cap`` slots, keeping the first ``keep``."""
    for i in range(len(store)) if layers is None else layers:
        old = store[i]
        new = old.new_zeros(old.shape[0], old.shape[1], new_cap, old.shape[3])
        new[:, :, :keep] = old[:, :, :keep]
        store[i] = new


def _check_windows(windows: Sequence[int | None] | None, num_layers: int) -> list[int | None]:
    if windows is None:
        return [None] * num_layers
    out = [int(w) if w else None for w in windows]
    if len(out) != num_layers:
        raise ValueError(f"got {len(out)} windows for {num_layers} layers")
    if any(w is not None and w < 1 for w in out):
        raise ValueError(f"windows must be positive token counts (or None), got {list(windows)}")
    return out


def _ring_labels(length: int, count: int, ring: int, held_from: int,
                 device: torch.device | None = None) -> torch.Tensor:
    """The slot of ring entries 0..count-1 once slots 0..length-1 were written into a ring of ``ring`` entries.

    Entry i holds the latest slot g < length with g = i (mod ring); -1 where that slot is below
    ``held_from`` (overwritten, or left over from before a crop): such keys must be masked.
    """
    i = torch.arange(count, device=device)
    g = (length - 1) - torch.remainder(length - 1 - i, ring)
    return torch.where(g >= held_from, g, torch.full_like(g, -1))


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
        windows: Sequence[int | None] | None = None,
        window_slack: int = WINDOW_SLACK,
    ) -> None:
        devices = list(device) if isinstance(device, (list, tuple)) else [device] * num_layers
        if len(devices) != num_layers:
            raise ValueError(f"got {len(devices)} devices for {num_layers} layers")
        self.num_layers, self.batch_size = num_layers, batch_size
        self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
        self.devices = [torch.device(d) for d in devices]
        self.quantizer = quantizer
        # Window attention: per layer the window (None: full attention); a windowed layer stores a ring.
        self.windows = _check_windows(windows, num_layers)
        self.window_slack = max(int(window_slack), 0)
        capacity = max(int(capacity), 1)
        self._capacity = capacity
        shapes = [(batch_size, num_heads, self._slots(layer, capacity), head_dim) for layer in range(num_layers)]
        store_dtype = torch.uint8 if quantizer is not None else dtype
        self.keys = [torch.zeros(shape, dtype=store_dtype, device=d) for shape, d in zip(shapes, self.devices)]
        self.values = [torch.zeros(shape, dtype=store_dtype, device=d) for shape, d in zip(shapes, self.devices)]
        self.key_scales, self.key_zeros, self.value_scales, self.value_zeros = _quant_params(
            quantizer, [shape[:3] + (1,) for shape in shapes], self.devices)
        # Per layer, the first slot a windowed layer still holds (slots below were overwritten in its ring).
        self.held_from = [0] * num_layers
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
                   quantizer=KVQuantizer.from_config(cfg, dtype), windows=cfg.layer_windows)

    @property
    def capacity(self) -> int:
        """Slots the cache can hold before growing (a windowed layer's ring may be smaller: :meth:`ring_size`)."""
        return self._capacity

    def _slots(self, layer: int, capacity: int) -> int:
        w = self.windows[layer]
        return capacity if w is None else min(capacity, w + self.window_slack)

    def ring_size(self, layer: int) -> int | None:
        """Entries of a windowed layer's ring (None for a full-attention layer)."""
        return None if self.windows[layer] is None else self.keys[layer].shape[2]

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
        layer %= self.num_layers
        ring = self.ring_size(layer)
        if ring is not None and (self.held_from[layer] or n > ring):
            # A windowed layer that wrapped: the slots it still holds, in order (a copy, not a view).
            idx = torch.arange(self.held_from[layer], n, device=self.keys[layer].device) % ring
            if self.quantizer is not None:
                return (tuple(t[layer].index_select(2, idx) for t in (self.keys, self.key_scales, self.key_zeros)),
                        tuple(t[layer].index_select(2, idx) for t in (self.values, self.value_scales,
                                                                       self.value_zeros)))
            return self.keys[layer].index_select(2, idx).transpose(1, 2), \
                self.values[layer].index_select(2, idx).transpose(1, 2)
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
        for layer in range(self.num_layers):
            size = self._slots(layer, new_cap)
            if size > self.keys[layer].shape[2]:
                # A ring smaller than its full size equals the old capacity: it never wrapped, slot == index.
                for store in self._stores():
                    if store:
                        _grow(store, size, self.length, [layer])
        mask = self.key_mask.new_ones(self.batch_size, new_cap)
        mask[:, : self.length] = self.key_mask[:, : self.length]
        self.key_mask = mask
        self._capacity = new_cap

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
        if self.windows[layer] is not None and end > self.keys[layer].shape[2]:
            return self._update_ring(layer, k, v)
        if self.quantizer is not None:
            return self._update_quantized(layer, k, v, end)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def _in_place(self, layer: int, t: int) -> bool:
        """Whether a chunk of ``t`` tokens can be written into ``layer``'s ring before attention: the slots
        it overwrites (those below end - ring) are older than any its queries see."""
        end, ring, w = self.length + t, self.keys[layer].shape[2], self.windows[layer]
        assert w is not None
        return end - ring <= max(0, self.length - w + 1)

    def key_slots(self, layer: int, t: int, device: torch.device | None = None) -> torch.Tensor:
        """The slot of each key :meth:`update` returns for ``layer`` and a chunk of ``t`` new tokens.

        -1 marks a key that holds no live slot (masked). For a full-attention layer, or a ring that
        has not wrapped, this is 0..length+t-1; otherwise the ring's entries in ring order, then (for
        a chunk too long to write in place) the new tokens. Call it before the layer's update.
        """
        start, end = self.length, self.length + t
        ring = self.ring_size(layer)
        held = self.held_from[layer]
        if ring is None or end <= ring:
            slots = torch.arange(end, device=device)
            return torch.where(slots >= held, slots, torch.full_like(slots, -1)) if held else slots
        if self._in_place(layer, t):
            return _ring_labels(end, ring, ring, max(held, end - ring), device)
        old = _ring_labels(start, min(start, ring), ring, held, device)
        return torch.cat([old, torch.arange(start, end, device=device)])

    def _update_ring(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """update() for a windowed layer whose ring wraps in this call (layout: :meth:`key_slots`)."""
        start, t = self.length, k.shape[2]
        end, ring = start + t, self.keys[layer].shape[2]
        in_place = self._in_place(layer, t)
        keep = min(t, ring)  # the new tokens that stay in the ring: the last ones
        idx = torch.arange(end - keep, end, device=self.keys[layer].device) % ring
        qz = self.quantizer
        out = []
        for x, stores in ((k, (self.keys, self.key_scales, self.key_zeros)),
                          (v, (self.values, self.value_scales, self.value_zeros))):
            parts = qz.quantize(x) if qz is not None else (x,)  # the whole chunk at once, as update() would
            old = None
            if not in_place:  # attention needs the ring as it was before this chunk
                held = min(start, ring)
                old = [s[layer][:, :, :held] for s in stores[: len(parts)]]
                old = qz.dequantize(*old) if qz is not None else old[0].clone()
            for store, part in zip(stores, parts):
                store[layer].index_copy_(2, idx, part[:, :, t - keep:].to(store[layer].dtype))
            if in_place:
                full = [s[layer] for s in stores[: len(parts)]]
                out.append(qz.dequantize(*full) if qz is not None else full[0])
            else:
                new = qz.dequantize(*parts) if qz is not None else x
                out.append(torch.cat([old, new.to(old.dtype)], dim=2))
        return out[0], out[1]

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
        for layer, w in enumerate(self.windows):
            if w is not None:
                self.held_from[layer] = max(self.held_from[layer], self.length - self.keys[layer].shape[2])

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

    def can_crop(self, length: int) -> bool:
        """Whether :meth:`crop` to ``length`` keeps every slot a later query needs (windowed layers keep only
        their last ring-size slots; full-attention caches can always be cropped)."""
        if not 0 <= length <= self.length:
            return False
        return all(w is None or self.held_from[i] <= max(0, length - w + 1) for i, w in enumerate(self.windows))

    def crop(self, length: int) -> None:
        """Forget everything after the first ``length`` slots (rewind a sequence; unpadded caches only).

        With window attention the rewind must stay within what the windowed layers' rings still hold
        (:meth:`can_crop`; up to ``window_slack + 1`` slots back once they wrapped); beyond, ValueError.
        """
        if length > self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        for i, w in enumerate(self.windows):
            if w is not None and self.held_from[i] > max(0, length - w + 1):
                raise ValueError(
                    f"cannot crop this cache to {length} slots: layer {i} has window attention (window {w}) and "
                    f"its ring holds only slots {self.held_from[i]}..{self.length - 1}; the next token would need "
                    f"slots {max(0, length - w + 1)}..{length - 1} (check cache.can_crop(n), else prefill again)")
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
                    quantizer: KVQuantizer | None = None,
                    windows: Sequence[int | None] | None = None) -> "KVCache":
        """Build a cache from official-layout tuples ([B, S, h, d] per tensor, keys post-RoPE).

        Also takes the official int8 layout (needs ``quantizer``, the model's). Float tuples given
        with a ``quantizer`` are quantized as one chunk per layer, as a prefill would be. With
        ``windows`` (window attention), a windowed layer's tuple may hold only the last slots (what
        ``to_legacy`` of a wrapped ring gives), at least the window - 1 that the next token sees.
        """
        quantized = isinstance(past[0][0], (tuple, list))  # ((qK, K_scale, K_zero), (qV, V_scale, V_zero))
        if quantized:
            if quantizer is None:
                raise ValueError("past_key_values in the int8 layout ((qK, scale, zero), (qV, scale, zero)) need a "
                                 "model loaded with use_cache_quantization=True")
            first = past[0][0][0]
            if first.dim() != 4 or first.dtype != torch.uint8:
                raise ValueError(f"int8 past_key_values must hold uint8 [B, heads, S, head_dim] tensors, got "
                                 f"{first.dtype} {tuple(first.shape)}")
            b, h, _, d = first.shape
            layers = [(kq, vq) for kq, vq in past]  # [B, h, S, .] already
            dtype, devices = quantizer.dtype, [kv[0][0].device for kv in past]
        else:
            first = past[0][0]
            if first.dim() != 4:
                raise ValueError(
                    f"past_key_values tensors must be [B, S, heads, head_dim], got shape {tuple(first.shape)}")
            b, _, h, d = first.shape
            layers = [((k.transpose(1, 2),), (v.transpose(1, 2),)) for k, v in past]
            if quantizer is not None:
                layers = [(quantizer.quantize(k[0]), quantizer.quantize(v[0])) for k, v in layers]
            dtype = quantizer.dtype if quantizer is not None else first.dtype
            devices = [kv[0].device for kv in past]
        windows = _check_windows(windows, len(past))
        sizes = [kv[0][0].shape[2] for kv in layers]
        s = max(sizes)
        for i, (n, w) in enumerate(zip(sizes, windows)):
            if n != s and (w is None or n < min(s, w - 1)):
                raise ValueError(f"past_key_values layer {i} holds {n} slots, the longest layer {s}: only a windowed "
                                 f"layer may hold fewer (the last ones, at least window - 1)")
        cache = cls(len(past), b, h, d, s + extra_capacity, dtype, devices, quantizer=quantizer, windows=windows)
        for i, (kparts, vparts) in enumerate(layers):
            n, ring = sizes[i], cache.keys[i].shape[2]
            keep = min(n, ring)
            idx = torch.arange(s - keep, s, device=cache.keys[i].device) % ring
            for parts, stores in ((kparts, (cache.keys, cache.key_scales, cache.key_zeros)),
                                  (vparts, (cache.values, cache.value_scales, cache.value_zeros))):
                for part, store in zip(parts, stores):
                    store[i].index_copy_(2, idx, part[:, :, n - keep:].to(store[i].dtype))
            if windows[i] is not None:
                cache.held_from[i] = s - keep
        cache.length = s
        cache.next_position.fill_(s)
        return cache


def _quant_params(quantizer: KVQuantizer | None, shapes: Sequence[tuple[int, ...]],
                  devices: list[torch.device]) -> tuple[list[torch.Tensor], ...]:
    """Per-layer zero-filled scale/zero storage (layer i: ``shapes[i]``) for keys and values (four empty
    lists without int8).

    Zero scales and zeros dequantize never-written slots to 0, a finite value, so a masked slot
    cannot leak NaN into attention (0 * NaN would).
    """
    if quantizer is None:
        return [], [], [], []
    return tuple([torch.zeros(shape, dtype=quantizer.param_dtype, device=d) for shape, d in zip(shapes, devices)]
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
    With window attention a windowed layer keeps a ring of min(capacity, window) slots per row (row r's
    slot g at index g mod ring): decode writes its token, then attends to the ring.
    """

    padded = True  # rows differ in length: attention always needs a mask

    def __init__(self, model: torch.nn.Module, max_rows: int, capacity: int = 256) -> None:
        cfg = model.config
        self.devices = [b.ln_1.weight.device for b in model.transformer.h]
        self.dtype = model.transformer.ln_f.weight.dtype
        self.quantizer = KVQuantizer.from_config(cfg, self.dtype)
        self.num_layers, self.max_rows = cfg.num_hidden_layers, max_rows
        self.windows = _check_windows(cfg.layer_windows, self.num_layers)
        self._capacity = max(1, capacity)
        shapes = [(max_rows, cfg.num_attention_heads, self._slots(layer, self._capacity), cfg.head_dim)
                  for layer in range(self.num_layers)]
        store_dtype = torch.uint8 if self.quantizer is not None else self.dtype
        self.keys = [torch.zeros(shape, dtype=store_dtype, device=d) for shape, d in zip(shapes, self.devices)]
        self.values = [torch.zeros(shape, dtype=store_dtype, device=d) for shape, d in zip(shapes, self.devices)]
        self.key_scales, self.key_zeros, self.value_scales, self.value_zeros = _quant_params(
            self.quantizer, [shape[:3] + (1,) for shape in shapes], self.devices)
        self.lengths = torch.zeros(max_rows, dtype=torch.long, device=self.devices[0])
        self.alphas = [1.0] * max_rows
        self.rows = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def _slots(self, layer: int, capacity: int) -> int:
        w = self.windows[layer]
        return capacity if w is None else min(capacity, w)

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
        span = self._span
        if self.windows[layer] is not None:  # a ring: row r's slot g at index g mod ring
            ring = self.keys[layer].shape[2]
            at, span = at % ring, min(span, ring)
        if self.quantizer is not None:
            return self._update_quantized(layer, k, v, rows, at, span)
        self.keys[layer][rows, :, at] = k[:, :, 0]
        self.values[layer][rows, :, at] = v[:, :, 0]
        return self.keys[layer][: self.rows, :, :span], self.values[layer][: self.rows, :, :span]

    def _update_quantized(self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                          at: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        qz, n = self.quantizer, self.rows
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

    def attention_mask(self, device: torch.device, window: int | None = None) -> torch.Tensor:
        """[rows, 1, 1, span] boolean: row r sees its own slots 0..lengths[r] (the new token included).

        With ``window`` (the layers of that window): over the ring's entries, row r sees the slots
        lengths[r] - window + 1 .. lengths[r] it holds."""
        now = self.lengths[: self.rows].to(device)[:, None]
        if window is None:
            slots = torch.arange(self._span, device=device)
            return (slots[None, :] <= now)[:, None, None, :]
        ring = min(self._capacity, window)  # the ring size of this window's layers
        i = torch.arange(min(self._span, ring), device=device)[None, :]
        held = now - torch.remainder(now - i, ring)  # the slot entry i holds, after this step's write
        return ((held >= 0) & (held > now - window))[:, None, None, :]

    def commit(self, num_new: int, new_positions_taken: torch.Tensor) -> None:
        self.lengths[: self.rows] += 1

    # -- row management
    def reserve(self, need: int) -> None:
        if need <= self.capacity:
            return
        new_cap = max(need, 2 * self.capacity)
        for layer in range(self.num_layers):
            size, old = self._slots(layer, new_cap), self.keys[layer].shape[2]
            if size > old:  # a ring below its window size equals the old capacity: it never wrapped
                for store in self._stores():
                    if store:
                        _grow(store, size, old, [layer])
        self._capacity = new_cap

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
        if prefilled.windows != self.windows:
            raise ValueError(f"cannot insert a cache with windows {prefilled.windows} into one with {self.windows}")
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
        for layer, w in enumerate(self.windows):
            if w is None:
                for dst_store, src_store in zip(self._stores(), prefilled._stores()):
                    if dst_store:  # the scale/zero lists are empty without int8
                        dst_store[layer][row, :, :n] = src_store[layer][index, :, first:total]
                continue
            # The slots the row's next tokens can see, from the prefill's ring to this row's ring.
            lo = max(first, total - w + 1)
            if prefilled.held_from[layer] > lo:
                raise ValueError(f"layer {layer}: the prefilled cache no longer holds slots {lo}..{total - 1}")
            slots = torch.arange(lo, total, device=self.keys[layer].device)
            src_idx = slots % prefilled.keys[layer].shape[2]
            dst_idx = (slots - first) % self.keys[layer].shape[2]
            for dst_store, src_store in zip(self._stores(), prefilled._stores()):
                if dst_store:  # the scale/zero lists are empty without int8
                    dst_store[layer][row, :, dst_idx] = src_store[layer][index][:, src_idx.to(src_store[layer].device)]
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
                for t in store:  # a ring (window attention) moves whole: its layout depends on the length only
                    t[row, :, :n] = t[last, :, :n]
            self.lengths[row] = self.lengths[last]
            self.alphas[row] = self.alphas[last]
            moved = last
        self.lengths[last] = 0
        self.rows = last
        return moved

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in self._stores() for t in store)
