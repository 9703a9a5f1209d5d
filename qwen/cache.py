"""The KV cache: one preallocated object per generation, not tuples grown by torch.cat.

Layout per layer: keys and values [B, n_heads, capacity, head_dim], keys stored after RoPE
(spec §4.7). Slots are shared by all rows (slot t of every row is written by the same
forward call); per-row state says which slots hold real tokens (``key_mask``), which
RoPE position the row's next real token takes (``next_position``; left padding does not
shift it, unlike the official code) and which dynamic-NTK alpha the row chose at prefill.

`generate` allocates the cache for prompt + max_new_tokens, so decoding never reallocates.
A cache made implicitly by ``model(ids, use_cache=True)`` grows by doubling when full.
"""

from __future__ import annotations

from typing import Sequence

import torch


class KVCache:
    """Preallocated key/value storage plus the per-sequence state of one batch."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | Sequence[torch.device | str] = "cpu",
    ) -> None:
        devices = list(device) if isinstance(device, (list, tuple)) else [device] * num_layers
        if len(devices) != num_layers:
            raise ValueError(f"got {len(devices)} devices for {num_layers} layers")
        self.num_layers, self.batch_size = num_layers, batch_size
        self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
        self.devices = [torch.device(d) for d in devices]
        capacity = max(int(capacity), 1)
        shape = (batch_size, num_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in self.devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in self.devices]
        self.length = 0  # slots filled (same for every row)
        self.key_mask = torch.ones(batch_size, capacity, dtype=torch.bool, device=self.devices[0])
        self.padded = False  # True once any slot is a pad: masks are needed
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=self.devices[0])
        self.ntk_alpha: list[float] | None = None  # chosen at prefill, kept (spec §4.4)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, capacity: int) -> "KVCache":
        """A cache shaped for ``model`` (a QWenLMHeadModel), placed on each layer's device."""
        cfg = model.config
        blocks = model.transformer.h
        devices = [b.ln_1.weight.device for b in blocks]
        dtype = model.transformer.ln_f.weight.dtype  # the activation dtype, whatever the linear layers hold
        return cls(cfg.num_hidden_layers, batch_size, cfg.num_attention_heads, cfg.head_dim, capacity, dtype, devices)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    # Read access like the official tuple-of-layers: len() is the layer count and cache[i] is layer i's
    # (K, V) as [B, S, heads, head_dim] views (sequence on dim 1, keys after RoPE), so code written
    # against the official past_key_values keeps working. cache.length is the number of filled slots.
    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.num_layers <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for a {self.num_layers}-layer cache")
        n = self.length
        return self.keys[layer][:, :, :n].transpose(1, 2), self.values[layer][:, :, :n].transpose(1, 2)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (self[i] for i in range(self.num_layers))

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more slots, doubling the capacity if needed."""
        need = self.length + extra
        if need <= self.capacity:
            return
        new_cap = max(need, 2 * self.capacity)
        for i in range(self.num_layers):
            for store in (self.keys, self.values):
                old = store[i]
                new = old.new_zeros(old.shape[0], old.shape[1], new_cap, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                store[i] = new
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
        """Write k, v [B, h, T, d] at the current slots; return views of all filled slots."""
        t = k.shape[2]
        end = self.length + t
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def commit(self, num_new: int, new_positions_taken: torch.Tensor) -> None:
        """Advance after all layers ran: ``num_new`` slots, and per-row count of real tokens added."""
        self.length += num_new
        self.next_position += new_positions_taken.to(self.next_position.device)

    # ------------------------------------------------------------------ manipulation
    def select_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only the given batch rows (e.g. drop finished sequences, or reorder for beams)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        for i in range(self.num_layers):
            d = self.keys[i].device
            self.keys[i] = self.keys[i].index_select(0, idx.to(d))
            self.values[i] = self.values[i].index_select(0, idx.to(d))
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
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # ------------------------------------------------------------------ official tuple format
    def to_legacy(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The official ``past_key_values`` layout: per layer (K, V) as [B, S, h, d] (spec §4.7)."""
        return tuple(self[i] for i in range(self.num_layers))

    @classmethod
    def from_legacy(cls, past: Sequence[Sequence[torch.Tensor]], extra_capacity: int = 0) -> "KVCache":
        """Build a cache from official-layout tuples ([B, S, h, d] per tensor, keys post-RoPE)."""
        k0 = past[0][0]
        if k0.dim() != 4:
            raise ValueError(f"past_key_values tensors must be [B, S, heads, head_dim], got shape {tuple(k0.shape)}")
        b, s, h, d = k0.shape
        cache = cls(len(past), b, h, d, s + extra_capacity, k0.dtype, [kv[0].device for kv in past])
        for i, (k, v) in enumerate(past):
            cache.keys[i][:, :, :s] = k.transpose(1, 2)
            cache.values[i][:, :, :s] = v.transpose(1, 2)
        cache.length = s
        cache.next_position.fill_(s)
        return cache


class RowKVCache:
    """Continuous-batching storage: batch row r holds one sequence at its own length.

    Unlike :class:`KVCache` (one shared slot counter, padding for ragged rows), every row writes its
    next key at its own length, so a sequence can join a running batch at any step and leave it
    without touching the others. Active sequences occupy rows ``0 .. rows-1``; a leaving sequence is
    replaced by the last row (one row copy), so the decode step always runs on a contiguous slice.
    Sequences enter prefilled (:meth:`insert` copies a one-row :class:`KVCache`); the model then
    runs single-token decode steps on the active rows. The capacity doubles when a row needs more
    room, so memory follows the longest live sequence instead of the worst case.
    """

    padded = True  # rows differ in length: attention always needs a mask

    def __init__(self, model: torch.nn.Module, max_rows: int, capacity: int = 256) -> None:
        cfg = model.config
        self.devices = [b.ln_1.weight.device for b in model.transformer.h]
        self.dtype = model.transformer.ln_f.weight.dtype
        self.num_layers, self.max_rows = cfg.num_hidden_layers, max_rows
        shape = (max_rows, cfg.num_attention_heads, max(1, capacity), cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=d) for d in self.devices]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=d) for d in self.devices]
        self.lengths = torch.zeros(max_rows, dtype=torch.long, device=self.devices[0])
        self.alphas = [1.0] * max_rows
        self.rows = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

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
        self.keys[layer][rows, :, at] = k[:, :, 0]
        self.values[layer][rows, :, at] = v[:, :, 0]
        return self.keys[layer][: self.rows, :, : self._span], self.values[layer][: self.rows, :, : self._span]

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
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros(old.shape[0], old.shape[1], new_cap, old.shape[3])
                new[:, :, : old.shape[2]] = old
                store[i] = new

    def insert(self, prefilled: KVCache) -> int:
        """Append a one-row prefilled cache as a new active row; returns its row index."""
        if self.rows >= self.max_rows:
            raise RuntimeError(f"all {self.max_rows} rows are in use")
        if prefilled.batch_size != 1 or prefilled.padded:
            raise ValueError("insert takes an unpadded one-row KVCache")
        n = prefilled.length
        self.reserve(n + 1)
        row = self.rows
        for i in range(self.num_layers):
            self.keys[i][row, :, :n] = prefilled.keys[i][0, :, :n]
            self.values[i][row, :, :n] = prefilled.values[i][0, :, :n]
        self.lengths[row] = int(prefilled.next_position[0])
        self.alphas[row] = prefilled.ntk_alpha[0] if prefilled.ntk_alpha else 1.0
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
            for i in range(self.num_layers):
                self.keys[i][row, :, :n] = self.keys[i][last, :, :n]
                self.values[i][row, :, :n] = self.values[i][last, :, :n]
            self.lengths[row] = self.lengths[last]
            self.alphas[row] = self.alphas[last]
            moved = last
        self.lengths[last] = 0
        self.rows = last
        return moved

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
