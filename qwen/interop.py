"""transformers interop: view a Qwen (v1) model as transformers' Qwen2ForCausalLM.

Qwen-1 is Qwen2 without grouped-query attention, once c_attn is split into q/k/v (with bias) and the
MLP names are mapped (w2 is the SiLU gate -> gate_proj, w1 -> up_proj, c_proj -> down_proj). Dynamic
NTK and LogN have no Qwen2 counterpart, so the equivalence holds while they are inactive (contexts up
to seq_length). The tests use this as their numerical reference and ``qwen bench`` as the peer engine.
"""

from __future__ import annotations

from typing import Any

import torch


def qwen2_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Qwen2 parameter names -> tensors that share storage with ``model``'s (row slices, no copies)."""
    cfg, sd = model.config, model.state_dict()
    h = cfg.hidden_size
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "model.norm.weight": sd["transformer.ln_f.weight"],
           "lm_head.weight": sd["lm_head.weight"] if "lm_head.weight" in sd else sd["transformer.wte.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        w, b = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[q + f"self_attn.{name}.weight"] = w[j * h:(j + 1) * h]
            out[q + f"self_attn.{name}.bias"] = b[j * h:(j + 1) * h]
        out[q + "self_attn.o_proj.weight"] = sd[p + "attn.c_proj.weight"]
        out[q + "mlp.gate_proj.weight"] = sd[p + "mlp.w2.weight"]
        out[q + "mlp.up_proj.weight"] = sd[p + "mlp.w1.weight"]
        out[q + "mlp.down_proj.weight"] = sd[p + "mlp.c_proj.weight"]
        out[q + "input_layernorm.weight"] = sd[p + "ln_1.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "ln_2.weight"]
    return out


def to_transformers_qwen2(model: Any, rope_theta: float | None = None) -> Any:
    """A transformers Qwen2ForCausalLM (eval, SDPA attention) carrying ``model``'s weights without copying them.

    ``rope_theta`` overrides the RoPE base (e.g. the NTK-stretched base, to check dynamic NTK).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = model.config
    if any(w is not None for w in cfg.layer_windows):
        raise ValueError("to_transformers_qwen2: this model uses window attention (use_window_attn), which "
                         "transformers' Qwen2 cannot express (its sliding window is another scheme)")
    ref_cfg = Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, rms_norm_eps=cfg.layer_norm_epsilon,
        rope_theta=float(rope_theta if rope_theta is not None else cfg.rotary_emb_base),
        max_position_embeddings=max(cfg.seq_length, cfg.max_position_embeddings),
        tie_word_embeddings=cfg.tie_word_embeddings, use_sliding_window=False, attention_dropout=0.0,
    )
    ref_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        ref = Qwen2ForCausalLM(ref_cfg)
    ref.load_state_dict(qwen2_state_dict(model), strict=False, assign=True)
    # Non-persistent buffers (the rotary inv_freq) were created on meta: rebuild them for real.
    with torch.device(model.device):
        ref.model.rotary_emb = type(ref.model.rotary_emb)(config=ref_cfg)
    if cfg.tie_word_embeddings:
        ref.lm_head.weight = ref.model.embed_tokens.weight
    missing = [n for n, p in ref.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"unmapped Qwen2 parameters: {missing[:4]}")
    ref.generation_config.pad_token_id = 0
    return ref.eval()
