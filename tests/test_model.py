"""The network: parity with transformers' Qwen2, the official long-context math, and invariants.

Tolerances: fp32 throughout; 1e-4 max abs against references (the issue's bar), 1e-5 for
self-consistency checks (cached vs uncached, batched vs single) where only summation order differs.
"""

from __future__ import annotations

import math

import pytest
import torch

from qwen.cache import KVCache
from qwen.config import QWenConfig, logn_factor, ntk_alpha, ntk_base, preset_config
from qwen.model import QWenLMHeadModel
from qwen.interop import to_transformers_qwen2

pytest.importorskip("transformers")


def make_model(preset: str = "tiny-vocab", seed: int = 0, **overrides) -> QWenLMHeadModel:
    torch.manual_seed(seed)
    model = QWenLMHeadModel(preset_config(preset, **overrides))
    model.init_weights(seed=seed)
    return model.eval()


# ------------------------------------------------------------------------------------------ formulas
def test_ntk_alpha_matches_spec_table():
    for s, table in {8192: [(1, 1), (8192, 1), (8193, 3), (16384, 3), (16385, 7), (32768, 7)],
                     2048: [(2048, 1), (2049, 3), (4096, 3), (4097, 7), (8192, 7), (8193, 15), (16384, 15)]}.items():
        for length, alpha in table:
            assert ntk_alpha(length, s) == alpha, (s, length)


def test_ntk_base_matches_spec_examples():
    assert ntk_base(10000, 1, 128) == 10000
    assert ntk_base(10000, 3, 128) == pytest.approx(30527.7367, abs=1e-3)
    assert ntk_base(10000, 7, 128) == pytest.approx(72195.86, abs=1e-2)
    assert ntk_base(10000, 15, 128) == pytest.approx(156588.32, abs=1e-2)


def test_logn_factor_matches_spec_examples():
    assert logn_factor(8191, 8192) == 1.0
    assert logn_factor(10239, 8192) == pytest.approx(1.024764, abs=1e-6)
    assert torch.tensor(logn_factor(10239, 8192)).bfloat16().item() == 1.0234375
    assert logn_factor(16383, 8192) == pytest.approx(1.0769, abs=1e-4)
    assert torch.tensor(logn_factor(16383, 8192)).bfloat16().item() == 1.078125
    assert logn_factor(32766, 8192) == pytest.approx(1.1538, abs=1e-4)
    assert torch.tensor(logn_factor(32766, 8192)).bfloat16().item() == 1.15625


def test_official_shapes_and_parameter_counts():
    for name, count, per_layer in (("qwen-7b", 7_721_324_544, 202_395_648), ("qwen-14b", 14_167_290_880, 315_253_760)):
        cfg = preset_config(name)
        assert cfg.num_parameters() == count
        with torch.device("meta"):
            model = QWenLMHeadModel(cfg)
        sd = model.state_dict()
        assert len(sd) == cfg.num_hidden_layers * 8 + 3
        assert sum(t.numel() for t in sd.values()) == count
        assert sum(t.numel() for k, t in sd.items() if k.startswith("transformer.h.0.")) == per_layer
    with torch.device("meta"):
        sd = QWenLMHeadModel(preset_config("qwen-7b")).state_dict()
    expected = {
        "transformer.wte.weight": (151936, 4096), "transformer.h.0.ln_1.weight": (4096,),
        "transformer.h.0.attn.c_attn.weight": (12288, 4096), "transformer.h.0.attn.c_attn.bias": (12288,),
        "transformer.h.0.attn.c_proj.weight": (4096, 4096), "transformer.h.0.ln_2.weight": (4096,),
        "transformer.h.0.mlp.w1.weight": (11008, 4096), "transformer.h.0.mlp.w2.weight": (11008, 4096),
        "transformer.h.0.mlp.c_proj.weight": (4096, 11008), "transformer.ln_f.weight": (4096,),
        "lm_head.weight": (151936, 4096),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert "transformer.h.0.attn.c_proj.bias" not in sd and "transformer.h.0.mlp.w1.bias" not in sd


# ------------------------------------------------------------------------------------------ parity
def test_parity_with_qwen2_prefill_and_32_cached_decode_steps():
    model = make_model(use_dynamic_ntk=False, use_logn_attn=False)
    ref = to_transformers_qwen2(model)
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        ours = model(ids, use_cache=False).logits
        theirs = ref(ids).logits
        assert (ours - theirs).abs().max().item() < 1e-4
        # 32 cached greedy steps on both sides: logits and tokens must agree.
        out = model(ids)
        cache = out.past_key_values
        ref_out = ref(ids, use_cache=True)
        ref_past = ref_out.past_key_values
        ours_next, theirs_next = out.logits[:, -1], ref_out.logits[:, -1]
        for _ in range(32):
            assert (ours_next - theirs_next).abs().max().item() < 1e-4
            tok = ours_next.argmax(-1, keepdim=True)
            assert torch.equal(tok, theirs_next.argmax(-1, keepdim=True))
            ours_next = model(tok, past_key_values=cache).logits[:, -1]
            ref_out = ref(tok, past_key_values=ref_past, use_cache=True)
            ref_past, theirs_next = ref_out.past_key_values, ref_out.logits[:, -1]
        assert cache.length == 24 + 32


def test_dynamic_ntk_equals_qwen2_with_the_stretched_base():
    """A prefill longer than seq_length rotates with base * alpha^(d/(d-2)) (spec §4.4)."""
    model = make_model(use_dynamic_ntk=True, use_logn_attn=False)  # seq_length 64
    ids = torch.randint(0, 512, (1, 150))  # 150 > 2*64 -> alpha 7
    alpha = ntk_alpha(150, 64)
    assert alpha == 7
    ref = to_transformers_qwen2(model, rope_theta=ntk_base(model.config.rotary_emb_base, alpha, model.config.rotary_dim))
    with torch.no_grad():
        diff = (model(ids, use_cache=False).logits - ref(ids).logits).abs().max().item()
    assert diff < 1e-4


# ------------------------------------------------------------------------------------------ official reference
def official_forward(model: QWenLMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    """A naive transcription of the official inference math for one unpadded batch (no cache):
    RoPE cache of length max(2L, 16) via torch.outer, NTK alpha from the length, the 32767-entry LogN
    table cast to the model dtype, manual softmax attention with a causal mask."""
    cfg = model.config
    sd = {k: v.float() for k, v in model.state_dict().items()}
    b, n = ids.shape
    dim = cfg.rotary_dim
    alpha = ntk_alpha(n, cfg.seq_length) if cfg.use_dynamic_ntk else 1
    base = cfg.rotary_emb_base * alpha ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    seq = torch.arange(max(2 * n, 16)).float()
    emb = torch.cat([torch.outer(seq, inv_freq)] * 2, dim=-1)
    cos, sin = emb.cos()[None, :n, None, :], emb.sin()[None, :n, None, :]
    logn = torch.tensor([math.log(i, cfg.seq_length) if i > cfg.seq_length else 1 for i in range(1, 32768)])
    logn = logn.to(model.dtype).float()

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_epsilon) * w

    def rot(t):
        t1, t2 = t[..., : dim // 2], t[..., dim // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    x = sd["transformer.wte.weight"][ids]
    h, nh, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}."
        a = rms(x, sd[p + "ln_1.weight"])
        qkv = a @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(b, n, nh, hd) for t in qkv.split(h, -1))
        q, k = rot(q), rot(k)
        if cfg.use_logn_attn and n > cfg.seq_length:
            q = q * logn[:n][None, :, None, None]
        w = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        w = w.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), torch.finfo(w.dtype).min)
        o = torch.einsum("bhqk,bkhd->bqhd", w.softmax(-1), v).reshape(b, n, h)
        x = x + o @ sd[p + "attn.c_proj.weight"].T
        a = rms(x, sd[p + "ln_2.weight"])
        m = (a @ sd[p + "mlp.w1.weight"].T) * torch.nn.functional.silu(a @ sd[p + "mlp.w2.weight"].T)
        x = x + m @ sd[p + "mlp.c_proj.weight"].T
    return rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("length", [40, 100, 200])
def test_matches_official_math_with_ntk_and_logn(length):
    model = make_model(use_dynamic_ntk=True, use_logn_attn=True)  # seq_length 64
    ids = torch.randint(0, 512, (2, length))
    with torch.no_grad():
        diff = (model(ids, use_cache=False).logits - official_forward(model, ids)).abs().max().item()
    assert diff < 1e-4


def test_logn_changes_output_only_beyond_seq_length():
    on, off = make_model(use_logn_attn=True), make_model(use_logn_attn=False)
    short, long = torch.randint(0, 512, (1, 64)), torch.randint(0, 512, (1, 80))
    with torch.no_grad():
        assert torch.equal(on(short, use_cache=False).logits, off(short, use_cache=False).logits)
        a, b = on(long, use_cache=False).logits, off(long, use_cache=False).logits
    assert torch.equal(a[:, :64], b[:, :64])  # positions < S have factor 1
    assert (a[:, 64:] - b[:, 64:]).abs().max() > 1e-5  # random tiny weights: small but far above rounding


def test_ntk_alpha_is_fixed_at_prefill_and_kept_while_decoding():
    model = make_model()  # NTK on, seq_length 64
    ids = torch.randint(0, 512, (1, 60))
    with torch.no_grad():
        out = model(ids)
        cache = out.past_key_values
        assert cache.ntk_alpha == [1.0]
        for _ in range(10):  # grow past seq_length: alpha stays 1 (official behaviour)
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache)
        assert cache.ntk_alpha == [1.0] and cache.length == 70
        long = model(torch.randint(0, 512, (1, 70)))
        assert long.past_key_values.ntk_alpha == [3.0]


# ------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("preset_kw", [{}, {"use_dynamic_ntk": False}])
def test_cached_equals_uncached(preset_kw):
    model = make_model(**preset_kw)
    ids = torch.randint(0, 512, (3, 40))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :25])
        steps = [out.logits]
        for j in range(25, 40):
            steps.append(model(ids[:, j:j + 1], past_key_values=out.past_key_values).logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5


def test_chunked_prefill_equals_full_prefill():
    """Chunks appended to a cache are causally masked (the official code drops the mask, spec §4.9)."""
    model = make_model()
    ids = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model.new_cache(2, 48)
        parts = [model(ids[:, s:s + 16], past_key_values=cache).logits for s in range(0, 48, 16)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


def test_left_padded_batch_rows_equal_single_rows():
    model = make_model()
    seqs = [torch.randint(0, 512, (n,)) for n in (12, 30, 21)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        batch_logits = out.logits
        cache = out.past_key_values
        nxt = torch.randint(0, 512, (len(seqs), 1))
        batch_step = model(nxt, attention_mask=torch.ones(len(seqs), 1), past_key_values=cache).logits
        for i, s in enumerate(seqs):
            single = model(s[None])
            assert (batch_logits[i, width - len(s):] - single.logits[0]).abs().max().item() < 1e-5
            step = model(nxt[i:i + 1], past_key_values=single.past_key_values).logits
            assert (batch_step[i] - step[0]).abs().max().item() < 1e-5


def test_right_padding_and_hf_style_mask_covering_the_past():
    model = make_model()
    ids = torch.randint(0, 512, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, use_cache=False).logits
        single = model(ids[1:, :7], use_cache=False).logits
        assert (logits[1, :7] - single[0]).abs().max().item() < 1e-5
        out = model(ids[:, :6])
        full_mask = torch.ones(2, 7)  # HF passes the mask over past + new
        step = model(ids[:, 6:7], attention_mask=full_mask, past_key_values=out.past_key_values).logits
        assert (step[:, 0] - model(ids[:, :7], use_cache=False).logits[:, -1]).abs().max().item() < 1e-5


def test_fully_padded_query_rows_stay_finite():
    model = make_model()
    ids = torch.randint(0, 512, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()


def test_legacy_tuple_cache_round_trip():
    model = make_model()
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        out = model(ids[:, :11])
        legacy = out.past_key_values.to_legacy()
        assert legacy[0][0].shape == (1, 11, 4, 16)  # [B, S, heads, head_dim], sequence on dim 1
        # The cache itself reads like the official tuple: len = layers, [i] = (K, V) of layer i.
        cache = out.past_key_values
        assert len(cache) == 2 and cache[1][1].shape == (1, 11, 4, 16) and torch.equal(cache[0][0], legacy[0][0])
        assert [kv[0].shape[1] for kv in cache] == [11, 11]
        a = model(ids[:, 11:], past_key_values=legacy).logits
        b = model(ids[:, 11:], past_key_values=out.past_key_values).logits
    assert torch.equal(a, b)


def test_cache_grows_when_used_beyond_its_capacity():
    model = make_model()
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        cache = model.new_cache(1, 4)
        a = torch.cat([model(ids[:, j:j + 1], past_key_values=cache).logits for j in range(20)], 1)
        b = model(ids, use_cache=False).logits
    assert cache.capacity >= 20 and (a - b).abs().max().item() < 1e-5


def test_loss_is_shifted_cross_entropy_and_ignores_minus_100():
    model = make_model()
    ids = torch.randint(0, 512, (2, 16))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1))
    assert out.loss is not None and torch.allclose(out.loss, manual)
    assert out.past_key_values is None  # no cache when computing a loss


def test_training_mode_disables_ntk_and_logn_and_checkpointing_keeps_gradients():
    model = make_model()
    ids = torch.randint(0, 512, (1, 100))  # beyond seq_length
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n
    plain = make_model(use_dynamic_ntk=False, use_logn_attn=False).train()
    assert torch.allclose(plain(ids, labels=ids).loss, loss)


def test_partial_rotary_and_tied_embeddings():
    model = make_model(rotary_pct=0.5, tie_word_embeddings=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :20])
        step = model(ids[:, 20:], past_key_values=out.past_key_values).logits
    assert (step - full[:, 20:]).abs().max().item() < 1e-5


def test_output_indexing_like_transformers():
    model = make_model()
    ids = torch.randint(0, 512, (1, 5))
    out = model(ids, labels=ids)
    assert out[0] is out.loss and out["logits"] is out.logits
    tup = model(ids, return_dict=False)
    assert torch.equal(tup[0], out.logits)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="seq_length"):
        QWenConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16})
    with pytest.raises(ValueError, match="kv_channels"):
        QWenConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "kv_channels": 8, "seq_length": 8})
    cfg = QWenConfig.from_dict({**preset_config("tiny").to_dict(), "auto_map": {"x": "y"}})
    assert cfg.to_dict()["auto_map"] == {"x": "y"}


def test_cache_select_rows_and_crop():
    model = make_model()
    ids = torch.randint(0, 512, (3, 10))
    with torch.no_grad():
        out = model(ids)
        cache: KVCache = out.past_key_values
        cache.select_rows([2, 0])
        step = model(ids[[2, 0], :1], past_key_values=cache).logits
        ref = model(torch.cat([ids[[2, 0]], ids[[2, 0], :1]], 1), use_cache=False).logits[:, -1:]
        assert (step - ref).abs().max().item() < 1e-5
        cache.crop(5)
        again = model(ids[[2, 0], 5:6], past_key_values=cache).logits
        ref = model(ids[[2, 0], :6], use_cache=False).logits[:, -1:]
        assert (again - ref).abs().max().item() < 1e-5
