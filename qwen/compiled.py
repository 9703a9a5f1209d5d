"""The compiled generation path: a static KV cache and two torch.compile'd functions (prefill, decode step).

The eager path (model.py + cache.py) is shaped by Python numbers that change every token: the cache
length slices the keys, the mask depends on it, NTK/LogN are chosen with host-side comparisons. Under
torch.compile each of those is a guard, so it would recompile per token. This module follows gpt-fast's
design instead, so that one graph serves every decode step:

- the cache is preallocated for ``max_batch_size`` x ``max_seq_len`` slots and attention always runs
  over all of it, with a mask built on the device from a slot tensor (``slot``: where the next token is
  written) and a per-slot validity table, so no shape ever changes while decoding;
- every per-sequence quantity is a tensor: the next RoPE position of each row, the NTK inverse
  frequencies each row chose at prefill (the alpha is computed on the device from the row's length,
  with exact integer arithmetic, and looked up in a table built with the eager code's own functions;
  as in the eager path and the official code it is chosen at prefill and kept while decoding, also
  when the sequence grows past seq_length),
  the LogN factor (computed from the positions in the graph and applied always: it is exactly 1 up to
  seq_length, as the eager path's "no factor");
- prompts are left-padded to a bucket length (powers of two from 16), so prefill compiles once per
  bucket, not once per prompt length; bucket pads are masked and take no RoPE position, so each row
  computes what it computes alone (the eager path's left-padding semantics);
- window attention keeps bounded storage: a windowed layer's cache is a ring of min(max_seq_len,
  window) entries (slot g at entry g mod ring), whose mask is computed from the slot tensor;
- KV-cache int8 stores uint8 plus scale/zero per slot as cache.py does, with the same quantizer
  functions; the official mode's per-chunk statistics leave the bucket pads out, so they cover the
  tokens the eager prefill would see.

What it computes equals the eager forward up to floating-point summation order (attention over the
whole static cache with masked slots instead of a cache prefix; inductor's fused kernels), so greedy
tokens agree and logits agree to ~1e-5 relative in fp32 (tests/test_compiled.py). qwen.generate routes
``generate(..., compile=True)`` (and ``"auto"``: CUDA only) through :func:`decoder_for`; the token loop
there samples on the device and looks at the tokens on the host only every few steps.

Compilations are counted per decoder (``CompiledDecoder.compilations``): one decode graph, one prefill
graph per bucket used. Each decoder compiles its own copies of the two functions, so its cache entries
in torch._dynamo neither count against another decoder's recompile limit nor outlive it.
"""

from __future__ import annotations

import math
import os
import threading
import types
import weakref
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .cache import KVQuantizer, dequantize_cache, quantize_cache_official, quantize_cache_round
from .config import ntk_alpha

SMALLEST_BUCKET = 16
COMPILE_ENV = "QWEN_COMPILE"  # "0" turns compile="auto" off (the default of generate()), "1" turns it on on CPU too
_DECODERS_PER_MODEL = 2  # each holds a static cache: keep the most recently used few
# CompiledDecoder options generate() builds its decoders with (e.g. {"backend": "eager"} in tests, or
# {"mode": "max-autotune"}); part of the key a decoder is reused under.
DEFAULT_OPTIONS: dict[str, Any] = {}


def prefill_buckets(max_seq_len: int, smallest: int = SMALLEST_BUCKET) -> list[int]:
    """Prompt lengths prefill compiles for: powers of two from ``smallest``, then ``max_seq_len - 1``
    (a prompt must leave one slot for the first decoded token)."""
    top = max(1, max_seq_len - 1)
    out, n = [], max(1, smallest)
    while n < top:
        out.append(n)
        n *= 2
    return out + [top]


def ntk_alpha_index(lengths: torch.Tensor, seq_length: int, entries: int) -> torch.Tensor:
    """Per row, k such that the dynamic-NTK alpha of a ``lengths``-token context is 2**(k+1) - 1 (k = 0: alpha 1).

    The integer form of config.ntk_alpha: alpha = max(1, 2**ceil(log2(n/S) + 1) - 1) is 1 for n <= S and
    2**(k+1) - 1 for S*2**(k-1) < n <= S*2**k, so k counts the j >= 0 with n > S*2**j. Capped at
    ``entries - 1`` (the table covers max_seq_len). Runs on the device, no host sync.
    """
    k = torch.zeros_like(lengths)
    for j in range(entries - 1):
        k = k + (lengths > seq_length * (1 << j)).long()
    return k


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model.apply_rope, op for op (importing model.py here would close the cycle model -> generate -> here)."""
    rot_dim = cos.shape[-1]
    tf = t.float()

    def rotated(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    if rot_dim == tf.shape[-1]:
        return rotated(tf).type_as(t)
    return torch.cat((rotated(tf[..., :rot_dim]), tf[..., rot_dim:]), dim=-1).type_as(t)


def _alpha_entries(max_seq_len: int, seq_length: int) -> int:
    k = 0
    while seq_length * (1 << k) < max_seq_len:
        k += 1
    return k + 1


def _quantize_official_masked(x: torch.Tensor, keep: torch.Tensor, qmin: torch.Tensor,
                              qmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cache.quantize_cache_official over the slots ``keep`` [B, T] only (min/max skip the bucket pads),
    with its arithmetic otherwise op for op (x's dtype, zero not rounded, truncation to uint8)."""
    b, h, t, d = x.shape
    m = keep[:, None, :, None].expand(b, h, t, d).reshape(b, h, t * d)
    flat = torch.flatten(x, 2)
    fmax = torch.amax(torch.where(m, flat, torch.full_like(flat, float("-inf"))), dim=-1, keepdim=True)
    fmin = torch.amin(torch.where(m, flat, torch.full_like(flat, float("inf"))), dim=-1, keepdim=True)
    scale = (fmax - fmin) / (qmax - qmin)
    zero = qmin - fmin / scale
    scale = scale.unsqueeze(-1).expand(-1, -1, t, 1)
    zero = zero.unsqueeze(-1).expand(-1, -1, t, 1)
    q = torch.clamp(x / scale + zero, qmin, qmax).to(torch.uint8)
    return q, scale, zero


class StaticKVCache:
    """Storage for :class:`CompiledDecoder`: fixed shapes, state as device tensors.

    Per layer keys/values [B, heads, R, head_dim] (R = max_seq_len, or a windowed layer's ring size),
    uint8 plus [B, heads, R, 1] scales/zeros with KV-cache int8. ``key_valid`` [B, max_seq_len]: which
    slots hold real tokens (False: pads); ``slot``: 0-d, the slot the next token is written to;
    ``positions`` [B]: each row's next RoPE position; ``inv_freq`` [B, 1, rotary_dim/2]: the RoPE
    frequencies of the NTK alpha each row chose at prefill.
    """

    def __init__(self, model: Any, batch_size: int, max_seq_len: int) -> None:
        cfg = model.config
        device = model.transformer.wte.weight.device
        self.dtype = model.transformer.ln_f.weight.dtype
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.windows = list(cfg.layer_windows)
        self.rings = [max_seq_len if w is None else min(max_seq_len, w) for w in self.windows]
        self.quantizer = KVQuantizer.from_config(cfg, self.dtype)
        heads, dim = cfg.num_attention_heads, cfg.head_dim
        store = torch.uint8 if self.quantizer is not None else self.dtype
        self.keys = [torch.zeros(batch_size, heads, r, dim, dtype=store, device=device) for r in self.rings]
        self.values = [torch.zeros(batch_size, heads, r, dim, dtype=store, device=device) for r in self.rings]
        self.key_scales: list[torch.Tensor] = []
        self.key_zeros: list[torch.Tensor] = []
        self.value_scales: list[torch.Tensor] = []
        self.value_zeros: list[torch.Tensor] = []
        if self.quantizer is not None:
            pd = self.quantizer.param_dtype
            for lst in (self.key_scales, self.key_zeros, self.value_scales, self.value_zeros):
                lst.extend(torch.zeros(batch_size, heads, r, 1, dtype=pd, device=device) for r in self.rings)
            self.qmin = self.quantizer.qmin.to(device)
            self.qmax = self.quantizer.qmax.to(device)
        self.key_valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device)
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.inv_freq = torch.zeros(batch_size, 1, cfg.rotary_dim // 2, dtype=torch.float32, device=device)
        if device.type == "cuda":
            # CUDA graphs replay fixed addresses: these are mutated in place, never reallocated.
            for t in self.tensors():
                torch._dynamo.mark_static_address(t)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values, *self.key_scales, *self.key_zeros, *self.value_scales,
                *self.value_zeros, self.key_valid, self.slot, self.positions, self.inv_freq]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _fresh_method(method: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of a bound method with its own code object: torch._dynamo keeps compiled variants (and
    counts recompiles) per code object, so each decoder gets its own."""
    f = method.__func__  # type: ignore[attr-defined]
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(g, method.__self__)  # type: ignore[attr-defined]


class CompiledDecoder:
    """Prefill and decode for up to ``max_batch_size`` rows and ``max_seq_len`` slots, in compiled graphs.

    ``prefill(input_ids, attention_mask=None)`` starts a new batch (left-padded like generate's input;
    its rows are padded on the left to a bucket length) and returns the next-token logits [b, vocab]
    in fp32; ``decode(tokens)`` appends one token per row and returns the next logits. Neither syncs
    with the device. A batch of fewer rows than ``max_batch_size`` is completed with empty rows.

    ``mode``: torch.compile's mode (default "reduce-overhead" on CUDA: CUDA graphs; none on CPU);
    ``backend``: "inductor" (default), "eager", "aot_eager" or a backend callable; ``compiled=False``
    runs the same static-shape functions without torch.compile (a reference for tests).
    ``compilations`` counts the graphs built: {"prefill": one per bucket used, "decode": 1}.
    """

    def __init__(self, model: Any, max_batch_size: int, max_seq_len: int, *, mode: str | None = None,
                 backend: str | Callable[..., Any] | None = None, fullgraph: bool = True,
                 buckets: Sequence[int] | None = None, compiled: bool = True) -> None:
        if model.training:
            raise ValueError("the compiled path is for inference: call model.eval() first")
        devices = {p.device for p in model.parameters()}
        if len(devices) > 1:
            raise ValueError(
                f"the compiled path needs the whole model on one device, found {sorted(map(str, devices))}")
        if max_seq_len < 2 or max_batch_size < 1:
            raise ValueError(f"need max_seq_len >= 2 and max_batch_size >= 1, got {max_seq_len}, {max_batch_size}")
        self.model = model
        cfg = model.config
        self.device = model.transformer.wte.weight.device
        if self.device.type == "cpu" and compiled:
            _check_traceable(model)
        self.max_batch_size, self.max_seq_len = int(max_batch_size), int(max_seq_len)
        self.cache = StaticKVCache(model, self.max_batch_size, self.max_seq_len)
        self.buckets = sorted({min(int(n), self.max_seq_len - 1) for n in (buckets or prefill_buckets(max_seq_len))})
        self.compilations = {"prefill": 0, "decode": 0}
        self.length = 0  # slots written so far (host-side copy of cache.slot: no sync needed to read it)
        self.rows = 0
        self.busy = False  # held by one generation at a time (decoder_for / release)
        self._warm: set[int] = set()  # prefill buckets run at least once
        self._decoded = False  # the decode step ran at least once
        self.config_key = config_key(model)
        self._lock = threading.Lock()
        # Inverse frequencies per NTK alpha, built by the eager path's own functions (bit-identical).
        entries = _alpha_entries(self.max_seq_len, cfg.seq_length) if cfg.use_dynamic_ntk else 1
        alphas = [1.0] + [float(2 ** (k + 1) - 1) for k in range(1, entries)]
        assert all(ntk_alpha(cfg.seq_length * (1 << k), cfg.seq_length) == a for k, a in enumerate(alphas))
        rotary = model.transformer.rotary_emb
        self.inv_freq_table = torch.stack([rotary._inv_freq(a, self.device) for a in alphas])
        if mode is None and self.device.type == "cuda" and backend in (None, "inductor"):
            mode = "reduce-overhead"
        self.mode, self.backend = mode, backend
        prefill, decode = _fresh_method(self._prefill_impl), _fresh_method(self._decode_impl)
        if compiled:
            prefill = torch.compile(prefill, backend=self._counting_backend("prefill"), fullgraph=fullgraph,
                                    dynamic=False)
            decode = torch.compile(decode, backend=self._counting_backend("decode"), fullgraph=fullgraph,
                                   dynamic=False)
        self._prefill_fn, self._decode_fn = prefill, decode
        self.compiled = compiled

    # ------------------------------------------------------------------ public
    @property
    def capacity(self) -> int:
        return self.max_seq_len

    def bucket(self, prompt_len: int) -> int:
        """The padded length a prompt of ``prompt_len`` tokens is prefilled at."""
        for n in self.buckets:
            if n >= prompt_len:
                return n
        raise ValueError(f"a prompt of {prompt_len} tokens does not fit this compiled decoder "
                         f"(max_seq_len {self.max_seq_len}: prompts up to {self.buckets[-1]} tokens)")

    def warm_up(self, prompt_len: int) -> None:
        """Build the graphs a prompt of ``prompt_len`` tokens needs (its prefill bucket, the decode step) now,
        on a dummy row, so that a failure shows before generation starts. A no-op once they were built."""
        if self.bucket(prompt_len) in self._warm and self._decoded:
            return
        self.prefill(torch.zeros(1, prompt_len, dtype=torch.long, device=self.device))
        self.decode(torch.zeros(1, dtype=torch.long, device=self.device))

    def release(self) -> None:
        """Mark the decoder free for the next generation (decoder_for hands it out busy)."""
        self.busy = False

    def remaining(self) -> int:
        """Tokens that can still be decoded in the current batch."""
        return self.max_seq_len - self.length

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Start a batch: input_ids [b, t] (left-padded; attention_mask 0 on pads) -> next-token logits [b, V] fp32."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        b, t = input_ids.shape
        if not 1 <= b <= self.max_batch_size:
            raise ValueError(f"batch of {b} rows for a compiled decoder of max_batch_size {self.max_batch_size}")
        n = self.bucket(t)
        ids = torch.zeros(self.max_batch_size, n, dtype=torch.long, device=self.device)
        ids[:b, n - t:] = input_ids.to(self.device)
        valid = torch.zeros(self.max_batch_size, n, dtype=torch.bool, device=self.device)
        if attention_mask is None:
            valid[:b, n - t:] = True
        else:
            mask = attention_mask.to(self.device).bool()
            if any(self.cache.windows):
                _check_contiguous(mask)
            valid[:b, n - t:] = mask
        # The official quantizer's per-chunk min/max cover what the eager prefill sees: all t columns.
        chunk = torch.zeros(self.max_batch_size, n, dtype=torch.bool, device=self.device)
        chunk[:b, n - t:] = True
        chunk[b:] = True  # empty rows: statistics over their pads stay finite
        with self._lock:
            if self.device.type == "cuda" and self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            logits = self._prefill_fn(ids, valid, chunk)
            self.length, self.rows = n, b
            self._warm.add(n)
        return logits[:b].clone()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (tokens [b]) -> next-token logits [b, V] fp32."""
        tokens = tokens.reshape(-1).to(self.device, torch.long)
        b = tokens.shape[0]
        if b != self.rows:
            raise ValueError(f"decode got {b} tokens for a batch of {self.rows} rows (prefill first)")
        if self.length >= self.max_seq_len:
            raise ValueError(f"the compiled decoder's cache is full ({self.max_seq_len} slots)")
        if b < self.max_batch_size:
            tokens = torch.cat([tokens, tokens.new_zeros(self.max_batch_size - b)])
        with self._lock:
            if self.device.type == "cuda" and self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            logits = self._decode_fn(tokens)
            self.length += 1
            self._decoded = True
        # A copy: with CUDA graphs the output buffer is overwritten by the next replay.
        return logits[:b].clone()

    # ------------------------------------------------------------------ compilation
    def _counting_backend(self, kind: str) -> Callable[..., Any]:
        backend = self.backend
        if backend is None or backend == "inductor":
            inner: Any = torch._TorchCompileInductorWrapper(self.mode, None, False)
        elif isinstance(backend, str):
            if self.mode is not None:
                raise ValueError(f"mode={self.mode!r} is an inductor setting; backend {backend!r} takes none")
            inner = torch._dynamo.lookup_backend(backend)
        else:
            inner = backend

        counts = self.compilations  # not self: torch._dynamo keeps every backend it saw, so this must not
        # keep the decoder (and its static cache) alive

        def counted(gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Any:
            counts[kind] += 1
            return inner(gm, example_inputs, **kwargs)

        return counted

    # ------------------------------------------------------------------ the static-shape math
    def _rope(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # As RotaryEmbedding.forward: the same fp32 product, then cat, cos, sin.
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos(), emb.sin()

    def _logn(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        cfg = self.model.config
        if not cfg.use_logn_attn:
            return None
        # As the eager path (double, then fp32, then the model dtype); exactly 1 up to seq_length.
        p = positions.double() + 1
        logn = torch.where(p > cfg.seq_length, p.log() / math.log(cfg.seq_length), torch.ones_like(p))
        return logn.float().to(dtype)

    def _qkv(self, block: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             logn: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = block.attn
        b, t, _ = x.shape
        q, k, v = attn.c_attn(block.ln_1(x)).split(attn.hidden_size, dim=-1)
        q = q.view(b, t, attn.num_heads, attn.head_dim)
        k = k.view(b, t, attn.num_heads, attn.head_dim)
        v = v.view(b, t, attn.num_heads, attn.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if logn is not None:
            q = q * logn[:, :, None, None]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _finish_block(self, block: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = x + block.attn.c_proj(y.transpose(1, 2).reshape(b, t, block.attn.hidden_size))
        return h + block.mlp(block.ln_2(h))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.transformer.ln_f(x[:, -1:])
        return self.model.lm_head(x)[:, -1].float()

    def _quantize(self, x: torch.Tensor, chunk: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        qz, c = self.cache.quantizer, self.cache
        assert qz is not None
        if qz.mode == "official":
            if chunk is None:
                return quantize_cache_official(x, c.qmin, c.qmax)
            return _quantize_official_masked(x, chunk, c.qmin, c.qmax)
        return quantize_cache_round(x)

    def _dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        # KVQuantizer.dequantize without its in-place ops (same two roundings: sub, then mul).
        qz = self.cache.quantizer
        assert qz is not None
        return dequantize_cache(q.to(qz.param_dtype), scale, zero).to(qz.dtype)

    def _prefill_impl(self, ids: torch.Tensor, valid: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        cfg, c = self.model.config, self.cache
        n = ids.shape[1]
        x = self.model.transformer.wte(ids)
        # Positions count real tokens only; a pad takes position 0 (it is masked anyway), as the eager path.
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        if cfg.use_dynamic_ntk:
            index = ntk_alpha_index(valid.long().sum(-1), cfg.seq_length, self.inv_freq_table.shape[0])
            inv_freq = self.inv_freq_table[index][:, None, :]
        else:
            inv_freq = self.inv_freq_table[:1][None].expand(ids.shape[0], 1, -1)
        cos, sin = self._rope(positions, inv_freq)
        logn = self._logn(positions, x.dtype)
        q_slot = torch.arange(n, device=ids.device)[:, None]
        k_slot = torch.arange(n, device=ids.device)[None, :]
        own = (q_slot == k_slot)[None, None]
        keys_ok = valid[:, None, None, :]
        masks: dict[int | None, torch.Tensor] = {}
        for w in dict.fromkeys(c.windows):
            band = k_slot <= q_slot if w is None else (k_slot <= q_slot) & (k_slot > q_slot - w)
            # A pad query keeps its own slot so its softmax is finite (its output is never used).
            masks[w] = (band[None, None] & keys_ok) | own
        for i, block in enumerate(self.model.transformer.h):
            q, k, v = self._qkv(block, x, cos, sin, logn)
            ring = c.rings[i]
            keep = min(n, ring)  # a ring keeps the last slots of the chunk
            idx = torch.arange(n - keep, n, device=ids.device) % ring
            if c.quantizer is not None:
                kparts, vparts = self._quantize(k, chunk), self._quantize(v, chunk)
                for parts, stores in ((kparts, (c.keys, c.key_scales, c.key_zeros)),
                                      (vparts, (c.values, c.value_scales, c.value_zeros))):
                    for part, store in zip(parts, stores):
                        store[i].index_copy_(2, idx, part[:, :, n - keep:].to(store[i].dtype))
                k, v = self._dequantize(*kparts), self._dequantize(*vparts)
            else:
                c.keys[i].index_copy_(2, idx, k[:, :, n - keep:])
                c.values[i].index_copy_(2, idx, v[:, :, n - keep:])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[c.windows[i]])
            x = self._finish_block(block, x, y)
        c.key_valid[:, :n].copy_(valid)
        c.key_valid[:, n:].fill_(True)
        c.slot.fill_(n)
        c.positions.copy_(valid.long().sum(-1))
        c.inv_freq.copy_(inv_freq)
        return self._head(x)

    def _decode_impl(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.cache
        x = self.model.transformer.wte(tokens[:, None])
        positions = c.positions[:, None]
        cos, sin = self._rope(positions, c.inv_freq)
        logn = self._logn(positions, x.dtype)
        slot = c.slot
        masks: dict[tuple[int, int | None], torch.Tensor] = {}
        for ring, w in dict.fromkeys(zip(c.rings, c.windows)):
            # Ring entry i holds slot slot - ((slot - i) mod ring) once this token is written (a full-attention
            # layer is a ring of max_seq_len entries: entry i holds slot i, or nothing yet for i > slot).
            i = torch.arange(ring, device=tokens.device)
            held = slot - torch.remainder(slot - i, ring)
            seen = (held >= 0) & c.key_valid.index_select(1, held.clamp(min=0))
            if w is not None:
                seen = seen & (held > slot - w)
            masks[(ring, w)] = seen[:, None, None, :]
        for i, block in enumerate(self.model.transformer.h):
            q, k, v = self._qkv(block, x, cos, sin, logn)
            at = torch.remainder(slot, c.rings[i]).reshape(1)
            if c.quantizer is not None:
                kparts, vparts = self._quantize(k, None), self._quantize(v, None)
                for parts, stores in ((kparts, (c.keys, c.key_scales, c.key_zeros)),
                                      (vparts, (c.values, c.value_scales, c.value_zeros))):
                    for part, store in zip(parts, stores):
                        store[i].index_copy_(2, at, part.to(store[i].dtype))
                k = self._dequantize(c.keys[i], c.key_scales[i], c.key_zeros[i])
                v = self._dequantize(c.values[i], c.value_scales[i], c.value_zeros[i])
            else:
                c.keys[i].index_copy_(2, at, k)
                c.values[i].index_copy_(2, at, v)
                k, v = c.keys[i], c.values[i]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[(c.rings[i], c.windows[i])])
            x = self._finish_block(block, x, y)
        c.slot.add_(1)
        c.positions.add_(1)
        return self._head(x)


def _check_traceable(model: Any) -> None:
    """On the CPU, refuse layers that call C code (qwen.cpu_pack's packed weights, the quantized CPU kernels,
    the int8 head): torch.compile can only trace torch ops, and would fail with a far less clear error."""
    norm = type(model.transformer.ln_f)
    plain = (torch.nn.Linear, torch.nn.Dropout, torch.nn.Identity, torch.nn.Embedding, norm)
    for name, module in [*model.transformer.h.named_modules(prefix="transformer.h"), ("lm_head", model.lm_head)]:
        if not any(True for _ in module.children()) and not isinstance(module, plain):
            raise ValueError(
                f"{name} is a {type(module).__name__}, which the compiled path cannot trace on the CPU (it calls "
                f"C code). Load the model with cpu_packed_weights=False (or qwen.cpu_pack.unpack_linear_layers), "
                f"and without CPU quantized kernels, or generate with compile=False (the fused C decode step is "
                f"the fast CPU path)")


def _check_contiguous(mask: torch.Tensor) -> None:
    """Window attention counts a row's tokens by slot: its real tokens must be contiguous (as model.py checks)."""
    m = mask.long()
    count = m.sum(-1)
    first = m.argmax(-1)
    last = m.shape[-1] - 1 - m.flip(-1).argmax(-1)
    if bool(((count > 0) & (last - first + 1 != count)).any()):
        raise ValueError("window attention counts the tokens of each row: its real tokens must be "
                         "contiguous (left or right padding only, no pads between real tokens)")


def compile_model(model: Any, max_batch_size: int, max_seq_len: int, mode: str | None = None,
                  backend: str | Callable[..., Any] | None = None, **kwargs: Any) -> CompiledDecoder:
    """A :class:`CompiledDecoder` for ``model`` (gpt-fast style: static cache, compiled prefill and decode)."""
    return CompiledDecoder(model, max_batch_size, max_seq_len, mode=mode, backend=backend, **kwargs)


# ------------------------------------------------------------------------------------- what generate() uses
_failed: "weakref.WeakSet[Any]" = weakref.WeakSet()
_registry_lock = threading.Lock()
_ATTRIBUTE = "_qwen_compiled_decoders"


class _Decoders(OrderedDict):  # type: ignore[type-arg]
    """A model's decoders, kept in an attribute of the model so that they live and die with it (a global
    table keyed by the model would be kept alive by the decoders' own references to it). Copies and
    pickles of the model start without any: compiled graphs and static caches do not travel."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_Decoders, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Decoders":
        return _Decoders()


def _registry(model: Any, create: bool = False) -> "_Decoders | None":
    found = model.__dict__.get(_ATTRIBUTE)
    if found is None and create:
        found = model.__dict__[_ATTRIBUTE] = _Decoders()
    return found


def config_key(model: Any) -> tuple[Any, ...]:
    """The config fields the compiled graphs bake in: a decoder is reused only while they stay the same."""
    cfg = model.config
    return (tuple(cfg.layer_windows), bool(cfg.use_dynamic_ntk), bool(cfg.use_logn_attn), int(cfg.seq_length),
            bool(getattr(cfg, "use_cache_quantization", False)), getattr(cfg, "cache_quantization_mode", "round"),
            model.transformer.ln_f.weight.dtype, model.transformer.wte.weight.device)


def capacity_for(prompt_len: int, max_new_tokens: int) -> int:
    """max_seq_len of the decoder a generation gets: a power of two (at least 256) holding the prompt's
    bucket plus the new tokens, so that nearby requests share one decoder and its graphs."""
    need = prompt_len + max_new_tokens + 1
    cap = 256
    while cap < need or prefill_buckets(cap)[-1] < prompt_len:
        cap *= 2
    while next(n for n in prefill_buckets(cap) if n >= prompt_len) + max_new_tokens > cap:
        cap *= 2
    return cap


def wants_compile(model: Any, compile: bool | str | None, cache: Any = None) -> bool:
    """Whether generate() takes the compiled path: ``True``, ``False``, or ``"auto"`` (CUDA models only;
    the environment variable QWEN_COMPILE=0/1 overrides "auto"). Never with a caller's KV cache (the
    eager path reuses it) or when compiling already failed for this model."""
    if compile is None:
        compile = "auto"
    if isinstance(compile, str):
        if compile != "auto":
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
        env = os.environ.get(COMPILE_ENV, "").strip().lower()
        if env in ("0", "false", "no", "off"):
            return False
        if cache is not None or model.training or model in _failed or torch.compiler.is_compiling():
            return False
        if env in ("1", "true", "yes", "on"):
            return True
        return model.device.type == "cuda" and len({p.device for p in model.parameters()}) == 1
    if compile and cache is not None:
        raise ValueError("compile=True cannot reuse a KV cache (cache=...): the compiled path owns a static one")
    return bool(compile)


def decoder_for(model: Any, batch_size: int, prompt_len: int, max_new_tokens: int,
                **kwargs: Any) -> CompiledDecoder | None:
    """The model's decoder for this request, marked busy (``release()`` it when done): the smallest free one
    kept for this config and options that has at least ``batch_size`` rows (the rest run empty) and fits
    the prompt's bucket plus ``max_new_tokens`` (its graphs are reused: a compile costs far more than idle
    rows), else a new one of ``batch_size`` rows and :func:`capacity_for` slots; the most recent few are
    kept. None while another generation holds the one that fits (a concurrent request)."""
    options = {**DEFAULT_OPTIONS, **kwargs}
    kind = (config_key(model), tuple(sorted((k, repr(v)) for k, v in options.items())))
    with _registry_lock:
        per_model = _registry(model, create=True)
        assert per_model is not None
        fits = [(key, d) for key, d in per_model.items()
                if key[0] == kind and d.max_batch_size >= batch_size and _fits(d, prompt_len, max_new_tokens)]
        free = [(key, d) for key, d in fits if not d.busy]
        if free:
            key, decoder = min(free, key=lambda kd: (kd[1].max_batch_size, kd[1].max_seq_len))
        elif fits:
            return None
        else:
            while len(per_model) >= _DECODERS_PER_MODEL and any(not d.busy for d in per_model.values()):
                oldest = next(k for k, d in per_model.items() if not d.busy)
                del per_model[oldest]
            capacity = capacity_for(prompt_len, max_new_tokens)
            decoder = CompiledDecoder(model, batch_size, capacity, **options)
            key = (kind, batch_size, capacity)
            per_model[key] = decoder
        per_model.move_to_end(key)
        decoder.busy = True
        return decoder


def _fits(decoder: CompiledDecoder, prompt_len: int, max_new_tokens: int) -> bool:
    return prompt_len <= decoder.buckets[-1] and decoder.bucket(prompt_len) + max_new_tokens <= decoder.max_seq_len


def decoders(model: Any) -> list[CompiledDecoder]:
    """The decoders generate() built for ``model`` and still keeps."""
    return list((_registry(model) or {}).values())


def mark_failed(model: Any) -> None:
    """compile="auto" stops trying for ``model`` (its graphs failed to build)."""
    _failed.add(model)
    clear_compiled(model)


def clear_compiled(model: Any) -> None:
    """Forget the decoders (and their static caches) built for ``model``: call after changing its weights
    or structure (the graphs captured the old modules)."""
    with _registry_lock:
        model.__dict__.pop(_ATTRIBUTE, None)
