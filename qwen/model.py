"""The Qwen (v1) network: nn.Modules and the math they need, nothing else.

Parameter names are the official ones (transformer.wte, transformer.h.N.attn.c_attn, mlp.w1/w2/c_proj,
ln_1/ln_2/ln_f, lm_head), so official checkpoints and LoRA adapters load without a key map.
Numerics follow the official pure-PyTorch path (spec §3-§6): RMSNorm normalises in fp32 and casts
back before the weight; RoPE (rotate-half) runs in fp32; SwiGLU gates w2; only c_attn has a bias.

Deliberate differences from the official code (docs/differences.md): RoPE positions count real
tokens only (left padding does not shift them), multi-token chunks appended to a cache are causally
masked, and per-sequence state (NTK alpha) lives in the KV cache, not on a module. Window attention
(``use_window_attn``, never released upstream) is our design: docs/long-context.md.
Loading and generation live in checkpoint.py and generate.py; chat (model.chat/chat_stream) in chat.py,
attached through qwen/transforms.py. This module is the network only.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache, KVQuantizer, RowKVCache
from .config import QWenConfig, ntk_alpha, ntk_base
from .transforms import decode_step_providers
from .transforms import method as registered_method


@dataclass
class CausalLMOutputWithPast:
    """What ``model(...)`` returns; indexable like transformers' ModelOutput (``out[0]``, ``out["logits"]``)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v for v in (self.loss, self.logits, self.past_key_values, self.hidden_states) if v is not None)

    def __getitem__(self, key: int | str) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.to_tuple())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Cast back to the input dtype *before* the weight multiply: the official order (spec §6).
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_inv_freq(base: float, rotary_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """inv_freq[i] = 1 / base^(2i/d), computed in fp32 exactly as the official RotaryEmbedding (spec §4.3)."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim features of t [B, T, h, d] with cos/sin [B|1, T, 1, rotary_dim], in fp32."""
    rot_dim = cos.shape[-1]
    tf = t.float()
    if rot_dim == tf.shape[-1]:
        return (tf * cos + rotate_half(tf) * sin).type_as(t)
    t_rot, t_pass = tf[..., :rot_dim], tf[..., rot_dim:]
    return torch.cat((t_rot * cos + rotate_half(t_rot) * sin, t_pass), dim=-1).type_as(t)


class RotaryEmbedding(nn.Module):
    """cos/sin for explicit positions; one inv_freq per NTK alpha (memoised, stateless per sequence)."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim, self.base = dim, float(base)
        # No inv_freq buffer: it would follow model.to(bf16); frequencies are always rebuilt in fp32.
        self._by_alpha: dict[float, torch.Tensor] = {}

    def _inv_freq(self, alpha: float, device: torch.device) -> torch.Tensor:
        key = float(alpha)
        cached = self._by_alpha.get(key)
        if cached is None or cached.device != device:
            cached = rope_inv_freq(ntk_base(self.base, key, self.dim), self.dim, device)
            self._by_alpha[key] = cached
        return cached

    def forward(self, positions: torch.Tensor, alphas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (long) -> cos, sin [B|1, T, 1, dim] in fp32."""
        device = positions.device
        if len(set(alphas)) == 1:
            inv = self._inv_freq(alphas[0], device)[None, None, :]  # [1, 1, dim/2]
        else:
            inv = torch.stack([self._inv_freq(a, device) for a in alphas])[:, None, :]  # [B, 1, dim/2]
        freqs = positions.float()[..., None] * inv  # [B, T, dim/2], same product as torch.outer
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos(), emb.sin()


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.hidden_size = config.hidden_size
        projection = config.kv_channels * config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * projection, bias=True)  # always biased (spec §2.2)
        self.c_proj = nn.Linear(projection, config.hidden_size, bias=not config.no_bias)
        self.attn_dropout_prob = config.attn_dropout_prob

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        logn: torch.Tensor | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer_idx: int,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(self.hidden_size, dim=-1)  # Q, K, V contiguous (spec §4.1)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_heads, self.head_dim)
        v = v.view(b, t, self.num_heads, self.head_dim)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if logn is not None:  # queries only, after RoPE (spec §4.5)
            q = q * logn[:, :, None, None]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, h, T, d]
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        dropout = self.attn_dropout_prob if self.training else 0.0
        if mask is None:
            # No padding and either a fresh full sequence (causal) or one query token (sees everything).
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=t > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, self.hidden_size))


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        ff = config.ffn_hidden_size
        self.w1 = nn.Linear(config.hidden_size, ff, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, ff, bias=not config.no_bias)
        self.c_proj = nn.Linear(ff, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))  # w2 is the gate (spec §2.3)


class QWenBlock(nn.Module):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, x, rope, logn, mask, cache, layer_idx):  # type: ignore[no-untyped-def]
        h = x + self.attn(self.ln_1(x), rope, logn, mask, cache, layer_idx)
        return h + self.mlp(self.ln_2(h))


class QWenModel(nn.Module):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, base=config.rotary_emb_base)
        self.h = nn.ModuleList(QWenBlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.fused_decode = True  # batch-1 fp32 CPU decode in one C call where it applies (qwen/kernels/decode.py)
        self._fused: Any = None

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        cfg = self.config
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        past = cache.length if cache is not None else 0
        device = x.device

        # ---- which new tokens are real (padding), and their RoPE positions
        new_mask = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
            if attention_mask.shape[-1] == past + t:  # HF style: the mask covers past + new
                attention_mask = attention_mask[:, past:]
            elif attention_mask.shape[-1] != t:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[-1]} columns; expected {t} (new tokens) "
                    f"or {past + t} (past + new)"
                )
            new_mask = attention_mask.bool()
            if bool(new_mask.all()):
                new_mask = None
        start = cache.next_position if cache is not None else torch.zeros(b, dtype=torch.long, device=device)
        if position_ids is not None:
            positions = position_ids.to(device).long().expand(b, t)
        elif new_mask is None:
            positions = start.to(device)[:, None] + torch.arange(t, device=device)
        else:  # count real tokens only; a pad takes its row's next position (it is masked anyway)
            positions = start.to(device)[:, None] + (new_mask.long().cumsum(-1) - 1).clamp(min=0)
        taken = new_mask.long().sum(-1) if new_mask is not None else torch.full((b,), t, device=device)

        # ---- dynamic NTK: alpha per row, chosen on the prefill call and kept (spec §4.4)
        if self.training or not cfg.use_dynamic_ntk:
            alphas = [1.0]
        elif cache is not None and cache.ntk_alpha is not None:
            alphas = cache.ntk_alpha
        else:
            lengths = (start.to(device) + taken).tolist()
            alphas = [float(ntk_alpha(n, cfg.seq_length)) for n in lengths]
            if len(set(alphas)) == 1:
                alphas = alphas[:1]
            if cache is not None:
                cache.ntk_alpha = alphas if len(alphas) == b else alphas * b
        cos, sin = self.rotary_emb(positions, alphas)

        # ---- LogN query scaling beyond seq_length (inference only; factors are 1 before S)
        logn = None
        if cfg.use_logn_attn and not self.training and past + t > cfg.seq_length:
            p = positions.double() + 1
            logn = torch.where(p > cfg.seq_length, p.log() / math.log(cfg.seq_length), torch.ones_like(p))
            logn = logn.float().to(x.dtype)  # the official table is fp32, then cast to the model dtype

        # ---- attention mask (None when SDPA's causal flag or no mask is exact)
        windows = cfg.layer_windows
        if cache is not None and cache.windows != windows:
            raise ValueError(f"this cache was made for window attention {cache.windows}, the model's config now "
                             f"gives {windows} (make a new cache after changing the window settings)")
        if cache is not None:
            cache.begin(new_mask, t)
        if isinstance(cache, RowKVCache):  # continuous batching: each row at its own length
            mask = cache.attention_mask(device)
        else:
            mask = self._build_mask(b, t, past, new_mask, cache, device)
        masks = self._window_masks(windows, mask, b, t, past, new_mask, cache, device) if any(windows) else None

        x = self.drop(x)
        hidden: list[torch.Tensor] = []
        fused = self._fused_decoder(x, cache, mask, output_hidden_states)
        if fused is not None:
            x = fused(x, cos, sin, 1.0 if logn is None else float(logn.reshape(-1)[0]), cache)
        for i, block in enumerate(self.h if fused is None else ()):
            dev = block.ln_1.weight.device
            if x.device != dev:  # layers spread over devices (device_map)
                x, cos, sin = x.to(dev), cos.to(dev), sin.to(dev)
                logn = logn.to(dev) if logn is not None else None
                mask = mask.to(dev) if mask is not None else None
            layer_mask = mask if masks is None else masks[i]
            if layer_mask is not None and layer_mask.device != dev:
                layer_mask = layer_mask.to(dev)
            if output_hidden_states:
                hidden.append(x)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, (cos, sin), logn, layer_mask, None, i,
                                                      use_reentrant=False)
            else:
                x = block(x, (cos, sin), logn, layer_mask, cache, i)
        if x.device != self.ln_f.weight.device:
            x = x.to(self.ln_f.weight.device)
        x = self.ln_f(x)
        if output_hidden_states:
            hidden.append(x)
        if cache is not None:
            cache.commit(t, taken)
        return x, (tuple(hidden) if output_hidden_states else None)

    def _fused_decoder(self, x: torch.Tensor, cache: KVCache | None, mask: torch.Tensor | None,
                       output_hidden_states: bool) -> Any:
        """A faster implementation of this decode step from a registered provider (qwen.transforms), or None.

        Providers answer only where they compute exactly what the blocks would (the fused C step of
        qwen/kernels/decode.py: batch-1 fp32 CPU decode); ``fused_decode = False`` turns them all off.
        ``self._fused`` is the provider's slot for what it built for this model."""
        if not self.fused_decode:
            return None
        for provider in decode_step_providers():
            step = provider(self, x, cache, mask, output_hidden_states)
            if step is not None:
                return step
        return None

    @staticmethod
    def _window_masks(windows: list[int | None], full: torch.Tensor | None, b: int, t: int, past: int,
                      new_mask: torch.Tensor | None, cache: Any, device: torch.device) -> list[torch.Tensor | None]:
        """Per layer, the mask its attention uses: ``full`` for full-attention layers, a band for windowed ones.

        Window attention (docs/long-context.md): key slot j is visible to query slot i iff
        i - window < j <= i (and j holds a real token). Slots are the tokens of a row's sequence; they
        equal positions when a row's real tokens are contiguous (left or right padding), which is checked.
        A windowed layer whose window covers every query shares ``full`` (same keys, same mask).
        """
        total = past + t
        if all(w is None or total <= w for w in windows):
            return [full] * len(windows)
        padded = new_mask is not None or (cache is not None and cache.padded)
        if padded and not isinstance(cache, RowKVCache):
            valid = cache.key_mask[:, :total] if cache is not None else new_mask
            count = valid.sum(-1)
            first = valid.long().argmax(-1)
            last = total - 1 - valid.long().flip(-1).argmax(-1)
            if bool(((count > 0) & (last - first + 1 != count)).any()):
                raise ValueError("window attention counts the tokens of each row: its real tokens must be "
                                 "contiguous (left or right padding only, no pads between real tokens)")
        by_layout: dict[Any, torch.Tensor | None] = {}
        out: list[torch.Tensor | None] = []
        for i, w in enumerate(windows):
            if w is None or total <= w:
                out.append(full)
                continue
            ring = None if cache is None else cache.keys[i].shape[2]
            if (w, ring) not in by_layout:
                if isinstance(cache, RowKVCache):
                    m = cache.attention_mask(device, w)
                else:
                    q = torch.arange(past, total, device=device)[:, None]
                    k = torch.arange(t, device=device) if cache is None else cache.key_slots(i, t, device)
                    m = ((k >= 0) & (k <= q) & (k > q - w))[None, None]
                    if padded:
                        keys = cache.key_mask.to(device)[:, k.clamp(min=0)] if cache is not None else new_mask
                        # A pad query keeps its own slot so its softmax is finite (its output is never used).
                        m = (m & keys[:, None, None, :]) | (k == q)[None, None]
                by_layout[(w, ring)] = m
            out.append(by_layout[(w, ring)])
        return out

    @staticmethod
    def _build_mask(
        b: int, t: int, past: int, new_mask: torch.Tensor | None, cache: KVCache | None, device: torch.device
    ) -> torch.Tensor | None:
        """Boolean [B|1, 1, T, past+T] (True = attend), or None when is_causal / no mask is exact."""
        padded = new_mask is not None or (cache is not None and cache.padded)
        if not padded and (past == 0 or t == 1):
            return None
        total = past + t
        q_slot = torch.arange(past, total, device=device)[:, None]
        k_slot = torch.arange(total, device=device)[None, :]
        mask = (k_slot <= q_slot)[None, None]  # causal in slot space, also for chunks appended to a cache
        if padded:
            if cache is not None:
                valid = cache.key_mask[:, :total].to(device)
            else:
                valid = new_mask if new_mask is not None else torch.ones(b, t, dtype=torch.bool, device=device)
            # A pad query keeps its own slot so its softmax is finite (its output is never used).
            mask = (mask & valid[:, None, None, :]) | (q_slot == k_slot)[None, None]
        return mask


def _linear_device(linear: nn.Module) -> torch.device:
    # Packed or quantized linear layers may not hold a dense .weight; ask their first tensor.
    if isinstance(linear, nn.Linear):
        return linear.weight.device
    for t in linear.parameters():
        return t.device
    return torch.device("cpu")


class QWenLMHeadModel(nn.Module):
    """The causal LM. ``model(input_ids, attention_mask=None, past_key_values=None, labels=None)``."""

    config_class = QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]

    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.generation_config: Any = None  # set by from_pretrained (qwen.generate.GenerationConfig)
        self.name_or_path: str = ""

    # ------------------------------------------------------------------ HF-like surface
    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.ln_f.weight.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.transformer.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.transformer.gradient_checkpointing = False

    def enable_input_require_grads(self) -> None:
        self.transformer.wte.register_forward_hook(lambda m, i, o: o.requires_grad_(True))

    def init_weights(self, seed: int | None = None) -> None:
        """Random init as the official _init_weights (spec §2.4)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                s = std / math.sqrt(2 * self.config.num_hidden_layers) if name.endswith("c_proj.weight") else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        return KVCache.for_model(self, batch_size, capacity)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | tuple | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        logits_to_keep: int = 0,
        **unused: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits for every position (or only the last ``logits_to_keep``), loss if labels are given.

        ``past_key_values`` is a KVCache (updated in place and returned) or official-layout tuples
        (the int8 layout ((qK, scale, zero), (qV, scale, zero)) when use_cache_quantization is on).
        Without a cache and with ``use_cache`` (default: config.use_cache, off when training or
        computing a loss) a cache is created and returned.
        """
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids or inputs_embeds")
        if input_ids is not None and input_ids.dim() == 1:
            input_ids = input_ids[None]
        if use_cache is None:
            use_cache = self.config.use_cache and labels is None and not self.training
        cache = past_key_values
        if isinstance(cache, (tuple, list)):
            cache = KVCache.from_legacy(cache, quantizer=KVQuantizer.from_config(self.config, self.dtype),
                                        windows=self.config.layer_windows)
        ref = input_ids if input_ids is not None else inputs_embeds
        if cache is None and use_cache:
            cache = self.new_cache(ref.shape[0], ref.shape[1])
        hidden, all_hidden = self.transformer(
            input_ids, attention_mask, cache, position_ids, inputs_embeds, output_hidden_states
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        head_device = _linear_device(self.lm_head)
        if hidden.device != head_device:
            hidden = hidden.to(head_device)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # Shift so position i predicts token i+1; loss in fp32 whatever the model dtype.
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1))
        out = CausalLMOutputWithPast(logits=logits, loss=loss, past_key_values=cache, hidden_states=all_hidden)
        return out if return_dict else out.to_tuple()

    # ------------------------------------------------------------------ convenience (implemented elsewhere)
    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        from .generate import generate

        return generate(self, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Methods defined outside the core (model.chat / model.chat_stream from qwen/chat.py), registered
        # in qwen.transforms: the official API stays on the model without this module importing the chat layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            function = None if name.startswith("_") else registered_method(name)
            if function is None:
                raise
            return types.MethodType(function, self)

    @classmethod
    def from_pretrained(cls, path: str, *args: Any, **kwargs: Any) -> "QWenLMHeadModel":
        """qwen.checkpoint.load_model (reached through the registry: checkpoint.py imports this module)."""
        return registered_method("load_model")(path, *args, **kwargs)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """qwen.checkpoint.save_model (reached through the registry, as from_pretrained)."""
        registered_method("save_model")(self, save_directory, **kwargs)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for n, p in self.named_parameters() if not (exclude_embeddings and "wte" in n)}
        return sum(p.numel() for p in params.values())
