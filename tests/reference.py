"""Test reference: transformers' Qwen2ForCausalLM carrying our weights (Qwen-1 == Qwen2 without GQA).

Mapping: c_attn splits into q/k/v (with bias), attn.c_proj -> o_proj, mlp.w2 -> gate_proj (the
SiLU branch), mlp.w1 -> up_proj, mlp.c_proj -> down_proj, ln_1/ln_2/ln_f -> the three RMSNorms.
Valid only with NTK and LogN off (Qwen2 has neither).
"""

from __future__ import annotations

import torch


def qwen2_reference(model, rope_theta=None):  # type: ignore[no-untyped-def]
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = model.config
    ref_cfg = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        rms_norm_eps=cfg.layer_norm_epsilon,
        rope_theta=float(rope_theta if rope_theta is not None else cfg.rotary_emb_base),
        max_position_embeddings=max(cfg.max_position_embeddings, 4096),
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_dropout=0.0,
        use_sliding_window=False,
    )
    ref_cfg._attn_implementation = "sdpa"
    ref = Qwen2ForCausalLM(ref_cfg).to(model.dtype).eval()
    sd = model.state_dict()
    h = cfg.hidden_size
    new = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "model.norm.weight": sd["transformer.ln_f.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        w, b = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            new[q + f"self_attn.{name}.weight"] = w[j * h:(j + 1) * h]
            new[q + f"self_attn.{name}.bias"] = b[j * h:(j + 1) * h]
        new[q + "self_attn.o_proj.weight"] = sd[p + "attn.c_proj.weight"]
        new[q + "mlp.gate_proj.weight"] = sd[p + "mlp.w2.weight"]
        new[q + "mlp.up_proj.weight"] = sd[p + "mlp.w1.weight"]
        new[q + "mlp.down_proj.weight"] = sd[p + "mlp.c_proj.weight"]
        new[q + "input_layernorm.weight"] = sd[p + "ln_1.weight"]
        new[q + "post_attention_layernorm.weight"] = sd[p + "ln_2.weight"]
    missing, unexpected = ref.load_state_dict(new, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return ref
