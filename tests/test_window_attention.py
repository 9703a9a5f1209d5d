"""Window attention (our design, docs/long-context.md): config, masks, ring caches, fused C step, server.

Semantics under test: in a windowed layer, key j is visible to query i iff i - window < j <= i, where
i and j count the tokens of the row's sequence (left padding excluded). Everything is compared with a
reference written here from that definition (plain matmuls and an explicit band mask), or with a
cache layout that cannot wrap. Tolerances: fp32, 1e-5 where only summation order differs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from qwen import kernels
from qwen.cache import WINDOW_SLACK, KVCache, RowKVCache
from qwen.config import ConfigError, QWenConfig, ntk_alpha, preset_config
from qwen.generate import generate_step
from qwen.model import QWenLMHeadModel

TOL = 1e-5


def make_model(seed: int = 0, **overrides) -> QWenLMHeadModel:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    kw = dict(num_hidden_layers=4)
    kw.update(overrides)
    model = QWenLMHeadModel(preset_config("tiny-vocab", **kw))  # seq_length 64, NTK and LogN on
    model.init_weights(seed=seed)
    return model.eval()


def windowed(window: int, layers: int | None = None, seed: int = 0, **kw: object) -> QWenLMHeadModel:
    return make_model(seed, use_window_attn=True, window_size=window, window_layers=layers, **kw)


def reference_forward(model: QWenLMHeadModel, ids: torch.Tensor, prefill: int | None = None) -> torch.Tensor:
    """Logits [B, T, vocab] of unpadded rows, from the definition: RoPE at positions 0..T-1 with the NTK
    alpha of the prefill's length (``prefill``, default T: a decode keeps the alpha its prefill chose),
    LogN factor log(p+1)/log(S) beyond S, and per layer softmax(q k^T / sqrt(d)) under the mask
    causal & (i - j < window) for windowed layers."""
    cfg = model.config
    sd = {k: v.float() for k, v in model.state_dict().items()}
    b, n = ids.shape
    dim = cfg.rotary_dim
    alpha = ntk_alpha(prefill or n, cfg.seq_length) if cfg.use_dynamic_ntk else 1
    base = cfg.rotary_emb_base * alpha ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    emb = torch.cat([torch.outer(torch.arange(n).float(), inv_freq)] * 2, dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    pos = torch.arange(n)
    logn = torch.tensor([math.log(p + 1) / math.log(cfg.seq_length) if p + 1 > cfg.seq_length else 1.0
                         for p in range(n)]).to(model.dtype).float()
    i, j = pos[:, None], pos[None, :]

    def rms(x, w):  # type: ignore[no-untyped-def]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_epsilon) * w

    def rot(t):  # type: ignore[no-untyped-def]
        t1, t2 = t[..., : dim // 2], t[..., dim // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    x = sd["transformer.wte.weight"][ids]
    h, nh, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    for layer, window in enumerate(cfg.layer_windows):
        p = f"transformer.h.{layer}."
        a = rms(x, sd[p + "ln_1.weight"])
        qkv = a @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(b, n, nh, hd) for t in qkv.split(h, -1))
        q, k = rot(q), rot(k)
        if cfg.use_logn_attn and n > cfg.seq_length:
            q = q * logn[None, :, None, None]
        band = j <= i
        if window is not None:
            band = band & (i - j < window)
        w = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        w = w.masked_fill(~band, float("-inf"))
        o = torch.einsum("bhqk,bkhd->bqhd", w.softmax(-1), v).reshape(b, n, h)
        x = x + o @ sd[p + "attn.c_proj.weight"].T
        a = rms(x, sd[p + "ln_2.weight"])
        m = (a @ sd[p + "mlp.w1.weight"].T) * torch.nn.functional.silu(a @ sd[p + "mlp.w2.weight"].T)
        x = x + m @ sd[p + "mlp.c_proj.weight"].T
    return rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


def decode_logits(model: QWenLMHeadModel, ids: torch.Tensor, prompt: int, cache: KVCache | None = None,
                  fused: bool = False) -> torch.Tensor:
    """Logits of a prefill of ``prompt`` tokens then one token per call, concatenated [B, T, vocab]."""
    model.transformer.fused_decode = fused
    try:
        with torch.no_grad():
            cache = cache if cache is not None else model.new_cache(ids.shape[0], 4)  # grows by doubling
            out = [model(ids[:, :prompt], past_key_values=cache).logits]
            for j in range(prompt, ids.shape[1]):
                out.append(model(ids[:, j:j + 1], past_key_values=cache).logits)
    finally:
        model.transformer.fused_decode = True
    return torch.cat(out, 1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------- config
def test_config_defaults_round_trip_and_layer_windows(tmp_path) -> None:  # type: ignore[no-untyped-def]
    plain = preset_config("tiny-vocab", num_hidden_layers=6)
    assert plain.layer_windows == [None] * 6
    assert not {"use_window_attn", "window_size", "window_layers", "window_sizes"} & set(plain.to_dict())
    on = plain.update(use_window_attn=True)
    assert on.layer_windows == [64, 64, 64, None, None, None]  # seq_length on the lower half
    assert on.update(window_size=8, window_layers=2).layer_windows == [8, 8, None, None, None, None]
    assert on.update(window_layers=0).layer_windows == [None] * 6
    per_layer = on.update(window_sizes=[4, None, 0, 16, 16, None])
    assert per_layer.layer_windows == [4, None, None, 16, 16, None]
    assert per_layer.update(use_window_attn=False).layer_windows == [None] * 6  # the switch gates everything
    cfg = on.update(window_size=8, window_layers=2, window_sizes=[4, None, 0, 16, 16, None])
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json_string())
    saved = json.loads(path.read_text())
    assert saved["use_window_attn"] is True and saved["window_sizes"] == [4, None, 0, 16, 16, None]
    again = QWenConfig.from_json_file(path)
    assert again == cfg and again.layer_windows == cfg.layer_windows


def test_model_save_and_load_keeps_the_window(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = windowed(6, layers=3)
    model.save_pretrained(str(tmp_path / "m"))
    loaded = QWenLMHeadModel.from_pretrained(str(tmp_path / "m"), progress=False).eval()
    assert loaded.config.layer_windows == [6, 6, 6, None]
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert max_diff(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits) < TOL


@pytest.mark.parametrize("field,value,message", [
    ("window_size", 0, "window_size must be a positive"),
    ("window_size", -3, "window_size must be a positive"),
    ("window_size", "8", "window_size must be a positive"),
    ("window_size", True, "window_size must be a positive"),
    ("window_layers", 7, r"window_layers must be a layer count in 0\.\.6"),
    ("window_layers", -1, "window_layers must be a layer count"),
    ("window_sizes", [8, 8], "window_sizes must be a list of 6 entries"),
    ("window_sizes", [8, -1, 0, 0, 0, 0], r"window_sizes\[1\] must be a positive"),
    ("window_sizes", [8, 2.5, 0, 0, 0, 0], r"window_sizes\[1\] must be a positive"),
    ("use_window_attn", "yes", "use_window_attn must be true or false"),
])
def test_config_errors_name_the_field(field, value, message) -> None:  # type: ignore[no-untyped-def]
    base = preset_config("tiny-vocab", num_hidden_layers=6).to_dict()
    with pytest.raises(ConfigError, match=message):
        QWenConfig.from_dict({**base, "use_window_attn": True, field: value})


# ------------------------------------------------------------------------------------------- prefill
@pytest.mark.parametrize("window", [50, 51, 200])
def test_window_covering_the_sequence_equals_full_attention(window: int) -> None:
    full, win = make_model(), windowed(window, layers=3)
    ids = torch.randint(0, 512, (2, 50))
    with torch.no_grad():
        assert max_diff(win(ids, use_cache=False).logits, full(ids, use_cache=False).logits) < TOL
        assert max_diff(decode_logits(win, ids, 30), decode_logits(full, ids, 30)) < TOL


@pytest.mark.parametrize("window,layers", [(1, 2), (5, 2), (16, 3), (16, 4), (49, 2)])
def test_prefill_equals_the_band_mask_reference(window: int, layers: int) -> None:
    model = windowed(window, layers)
    ids = torch.randint(0, 512, (2, 50))  # below seq_length: no NTK / LogN
    ref = reference_forward(model, ids)
    with torch.no_grad():
        assert max_diff(model(ids, use_cache=False).logits, ref) < TOL
        cache = model.new_cache(2, 8)  # a ring smaller than the prompt: filled once, grows with the cache
        assert max_diff(model(ids, past_key_values=cache).logits, ref) < TOL
    assert max_diff(ref, reference_forward(make_model(), ids)) > 1e-4  # the window really changes the result


def test_per_layer_window_sizes() -> None:
    model = make_model(use_window_attn=True, window_sizes=[3, None, 9, 4])
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        assert max_diff(model(ids, use_cache=False).logits, reference_forward(model, ids)) < TOL
        assert max_diff(decode_logits(model, ids, 5), reference_forward(model, ids)) < TOL


# ------------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("window,prompt", [(8, 10), (8, 100), (20, 3), (3, 90)])
def test_token_by_token_decode_equals_uncached(window: int, prompt: int) -> None:
    """Past the ring's wrap (window + WINDOW_SLACK slots): cached decode == the reference."""
    model = windowed(window, layers=2)
    ids = torch.randint(0, 512, (2, window + WINDOW_SLACK + 40))  # beyond seq_length 64: LogN on
    ref = reference_forward(model, ids, prefill=prompt)
    assert max_diff(decode_logits(model, ids, prompt), ref) < TOL


@pytest.mark.parametrize("chunk", [1, 3, WINDOW_SLACK + 1, WINDOW_SLACK + 2, 50, 200])
@pytest.mark.parametrize("slack", [0, 2, WINDOW_SLACK])
def test_chunked_prefill_written_in_place_or_beside_the_ring(chunk: int, slack: int) -> None:
    """Chunks up to slack + 1 tokens are written into the ring before attention, longer ones attend to
    ring + chunk: both equal the reference, whatever the ring size."""
    model = windowed(12, layers=2)
    ids = torch.randint(0, 512, (1, 180))
    ref = reference_forward(model, ids, prefill=min(chunk, 180))  # the first chunk chooses the NTK alpha
    cfg = model.config
    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_attention_heads, cfg.head_dim, 4,
                    windows=cfg.layer_windows, window_slack=slack)
    with torch.no_grad():
        parts = [model(ids[:, s:s + chunk], past_key_values=cache).logits for s in range(0, 180, chunk)]
    assert max_diff(torch.cat(parts, 1), ref) < TOL
    assert cache.ring_size(0) == 12 + slack and cache.ring_size(3) is None


def test_left_padded_batch_rows_equal_single_rows() -> None:
    model = windowed(10, layers=2)
    model.transformer.fused_decode = False
    seqs = [torch.randint(0, 512, (n,)) for n in (7, 30, 19)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
    steps = torch.randint(0, 512, (len(seqs), WINDOW_SLACK + 20))  # decode past the ring's wrap
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        cache = out.past_key_values
        batch = [out.logits]
        for j in range(steps.shape[1]):
            batch.append(model(steps[:, j:j + 1], past_key_values=cache).logits)
        batch_logits = torch.cat(batch, 1)
        uncached = model(ids, attention_mask=mask, use_cache=False).logits
        for i, s in enumerate(seqs):
            alone = reference_forward(model, torch.cat([s, steps[i]])[None], prefill=len(s))[0]
            assert max_diff(batch_logits[i, width - len(s):], alone) < TOL
            assert max_diff(uncached[i, width - len(s):], alone[: len(s)]) < TOL
    model.transformer.fused_decode = True


def test_pads_between_real_tokens_are_refused() -> None:
    model = windowed(4, layers=2)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        right = torch.ones(1, 12, dtype=torch.long)
        right[0, 9:] = 0  # right padding is fine: no real token follows a pad
        assert max_diff(model(ids, attention_mask=right, use_cache=False).logits[:, :9],
                        reference_forward(model, ids[:, :9])) < TOL
        holes = torch.ones(1, 12, dtype=torch.long)
        holes[0, 5] = 0
        with pytest.raises(ValueError, match="contiguous"):
            model(ids, attention_mask=holes, use_cache=False)


def test_dynamic_ntk_and_logn_beyond_seq_length() -> None:
    """A 150-token sequence (seq_length 64): NTK alpha 3 from the whole length, LogN per absolute position."""
    model = windowed(20, layers=2)
    assert model.config.use_dynamic_ntk and model.config.use_logn_attn
    ids = torch.randint(0, 512, (1, 150))
    ref = reference_forward(model, ids)
    with torch.no_grad():
        assert max_diff(model(ids, use_cache=False).logits, ref) < TOL
        # Decode past seq_length from a prompt beyond it (alpha 3 is chosen at the prefill and kept).
        cache = model.new_cache(1, 150)
        model(ids[:, :100], past_key_values=cache)
        assert cache.ntk_alpha == [float(ntk_alpha(100, 64))] == [3.0]
    stepped = decode_logits(model, ids, 100)  # alpha 3 of the 100-token prefill (150 tokens alone: 7)
    assert max_diff(stepped, reference_forward(model, ids, prefill=100)) < TOL
    assert ntk_alpha(150, 64) == 7 and max_diff(stepped, ref) > 1e-4


@pytest.mark.parametrize("mode", ["round", "official"])
def test_kv_cache_int8(mode: str) -> None:
    """int8 ring == int8 storage that never wraps (same quantizer per chunk), and close to the float cache."""
    model = windowed(8, layers=2, use_cache_quantization=True, cache_quantization_mode=mode)
    cfg = model.config
    ids = torch.randint(0, 512, (2, 120))
    ring = decode_logits(model, ids, 30)
    quantizer = model.new_cache(1, 1).quantizer
    assert quantizer is not None and quantizer.mode == mode
    flat = KVCache(cfg.num_hidden_layers, 2, cfg.num_attention_heads, cfg.head_dim, 4, quantizer=quantizer,
                   windows=cfg.layer_windows, window_slack=10_000)  # rings as large as the cache: nothing wraps
    # The ring attends in ring order: rounding differs at 1e-7, which the official quantizer's truncation
    # can turn into a one-step code difference downstream, hence its looser bar.
    tol = TOL if mode == "round" else 1e-2 * ring.abs().max().item()
    assert max_diff(ring, decode_logits(model, ids, 30, cache=flat)) < tol
    cache = model.new_cache(2, 120)
    assert cache.keys[0].dtype == torch.uint8 and cache.keys[0].shape[2] == 8 + WINDOW_SLACK
    ref = reference_forward(model, ids, prefill=30)
    assert max_diff(ring, ref) / ref.abs().max().item() < 0.05


def test_bf16_ring_equals_unwrapped_storage() -> None:
    model = windowed(8, layers=2).to(torch.bfloat16)
    cfg = model.config
    ids = torch.randint(0, 512, (1, 110))
    flat = KVCache(cfg.num_hidden_layers, 1, cfg.num_attention_heads, cfg.head_dim, 4, dtype=torch.bfloat16,
                   windows=cfg.layer_windows, window_slack=10_000)
    a, b = decode_logits(model, ids, 20), decode_logits(model, ids, 20, cache=flat)
    assert a.dtype == torch.bfloat16 and max_diff(a, b) < 1e-2 * b.float().abs().max().item()
    ref = reference_forward(model, ids, prefill=20)
    assert max_diff(a, ref) < 0.05 * ref.abs().max().item()


# ------------------------------------------------------------------------------------------- cache
def test_cache_memory_of_windowed_layers_stays_bounded_while_generating() -> None:
    window = 16
    model = windowed(window, layers=2)
    prompt = torch.randint(0, 512, (1, 8))
    new = 4 * window + WINDOW_SLACK
    cache = model.new_cache(1, prompt.shape[1] + new)
    with torch.no_grad():
        steps = list(generate_step(model, prompt, max_new_tokens=new, cache=cache))
    assert len(steps) == new and cache.length == prompt.shape[1] + new - 1
    ring = window + WINDOW_SLACK
    for layer in range(4):
        want = ring if layer < 2 else cache.capacity
        assert cache.keys[layer].shape == cache.values[layer].shape == (1, 4, want, 16)
    # A cache that grows by doubling: the full layers follow the length, the rings do not.
    grow = model.new_cache(1, 4)
    ids = torch.randint(0, 512, (1, 300))
    with torch.no_grad():
        for j in range(300):
            model(ids[:, j:j + 1], past_key_values=grow)
    assert grow.capacity >= 300 and grow.keys[3].shape[2] == grow.capacity
    assert grow.keys[0].shape[2] == grow.keys[1].shape[2] == ring
    per_slot = 2 * 4 * 16 * 4  # K and V, heads, head_dim, fp32
    assert grow.nbytes() == per_slot * (2 * ring + 2 * grow.capacity)


def test_generate_equals_the_reference_greedily() -> None:
    model = windowed(6, layers=2)
    prompt = torch.randint(0, 512, (1, 5))
    out = model.generate(prompt, max_new_tokens=90, do_sample=False, eos_token_id=None)
    ref = reference_forward(model, out[:, :-1], prefill=5)
    assert torch.equal(ref[0, 4:].argmax(-1), out[0, 5:])


def test_crop_within_the_ring_and_refusal_beyond() -> None:
    model = windowed(8, layers=2)
    model.transformer.fused_decode = False
    ids = torch.randint(0, 512, (1, 120))
    with torch.no_grad():
        cache = model.new_cache(1, 120)
        model(ids[:, :100], past_key_values=cache)  # ring 8 + 64 = 72 < 100: wrapped
        assert cache.held_from[0] == 100 - 72 and cache.held_from[3] == 0
        # Rewinding up to WINDOW_SLACK + 1 slots keeps the window - 1 slots the next token sees.
        assert cache.can_crop(100 - WINDOW_SLACK - 1) and cache.can_crop(99) and cache.can_crop(100)
        assert not cache.can_crop(100 - WINDOW_SLACK - 2) and not cache.can_crop(0) and not cache.can_crop(101)
        with pytest.raises(ValueError, match=r"layer 0 has window attention \(window 8\).*can_crop"):
            cache.crop(20)
        cache.crop(60)
        got = model(ids[:, 60:80], past_key_values=cache).logits
        assert max_diff(got, reference_forward(model, ids[:, :80], prefill=100)[:, 60:]) < TOL
        # A cache whose rings never wrapped crops anywhere (the eval prefix cache, chat sessions).
        short = model.new_cache(1, 40)
        model(ids[:, :40], past_key_values=short)
        assert short.can_crop(3)
        short.crop(3)
        got = model(ids[:, 3:30], past_key_values=short).logits
        assert max_diff(got, reference_forward(model, ids[:, :30])[:, 3:]) < TOL
    model.transformer.fused_decode = True


def test_legacy_tuples_round_trip_and_select_rows() -> None:
    model = windowed(8, layers=2)
    model.transformer.fused_decode = False
    ids = torch.randint(0, 512, (3, 100))
    ref = reference_forward(model, ids)
    with torch.no_grad():
        out = model(ids[:, :90])
        legacy = out.past_key_values.to_legacy()
        assert [kv[0].shape[1] for kv in legacy] == [72, 72, 90, 90]  # a wrapped ring gives its last slots
        got = model(ids[:, 90:], past_key_values=legacy).logits
        assert max_diff(got, ref[:, 90:]) < TOL
        cache = out.past_key_values
        cache.select_rows([2, 0])
        got = model(ids[[2, 0], 90:], past_key_values=cache).logits
        assert max_diff(got, ref[[2, 0], 90:]) < TOL
    model.transformer.fused_decode = True


def test_a_cache_made_for_other_windows_is_refused() -> None:
    model = windowed(8, layers=2)
    cache = model.new_cache(1, 16)
    model.config.window_size = 4
    with pytest.raises(ValueError, match="made for window attention"):
        model(torch.randint(0, 512, (1, 5)), past_key_values=cache)


# ------------------------------------------------------------------------------------------- fused C step
@pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.why_unavailable()}")
@pytest.mark.parametrize("layers,prompt", [(2, 10), (2, 100), (4, 3), (0, 10)])
def test_fused_decode_step_equals_the_python_step(layers: int, prompt: int) -> None:
    model = windowed(8, layers=layers, seed=3)
    ids = torch.randint(0, 512, (1, 8 + WINDOW_SLACK + 30))
    fused = decode_logits(model, ids, prompt, fused=True)
    assert model.transformer._fused is not None, "the fused step was not used"
    python = decode_logits(model, ids, prompt, fused=False)
    assert max_diff(fused, python) < 1e-4 * python.abs().max().item()
    assert torch.equal(fused.argmax(-1), python.argmax(-1))
    assert max_diff(fused, reference_forward(model, ids, prefill=prompt)) < 1e-4 * python.abs().max().item()


# ------------------------------------------------------------------------------------------- serving
def test_row_cache_decode_equals_the_reference() -> None:
    model = windowed(6, layers=2, vocab_size=1000)
    prompts = [torch.randint(0, 1000, (n,)).tolist() for n in (5, 40, 90, 2)]
    rows = RowKVCache(model, max_rows=4, capacity=4)  # small: rings grow to the window, full layers further
    steps = 80
    follow = torch.randint(0, 1000, (len(prompts), steps))
    with torch.no_grad():
        # Two rows from one left-padded batched prefill, two alone.
        batch_ids = torch.zeros(2, 90, dtype=torch.long)
        mask = torch.zeros(2, 90, dtype=torch.bool)
        for r, i in enumerate((1, 2)):
            batch_ids[r, 90 - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, 90 - len(prompts[i]):] = True
        batch = model.new_cache(2, 90)
        model(batch_ids, attention_mask=mask, past_key_values=batch)
        for i in (0, 3):
            single = model.new_cache(1, len(prompts[i]))
            model(torch.tensor([prompts[i]]), past_key_values=single)
            rows.insert(single)
            if i == 0:
                rows.insert(batch, 0)
                rows.insert(batch, 1)
        order = [0, 1, 2, 3]
        got = [model(follow[order, j:j + 1], past_key_values=rows).logits[:, -1] for j in range(steps)]
    assert rows.keys[0].shape[2] == 6 and rows.keys[3].shape[2] == rows.capacity >= 90 + steps
    for slot, i in enumerate(order):
        seq = torch.tensor([prompts[i] + follow[i].tolist()])
        ref = reference_forward(model, seq, prefill=len(prompts[i]))[0, len(prompts[i]):]
        assert max_diff(torch.stack([g[slot] for g in got]), ref) < TOL
    assert rows.remove(0) == 3  # the last row moves into row 0, its ring with it
    with torch.no_grad():
        nxt = model(torch.tensor([[1], [2], [3]]), past_key_values=rows).logits[:, -1]
    seq = torch.tensor([prompts[3] + follow[3].tolist() + [1]])
    ref = reference_forward(model, seq, prefill=len(prompts[3]))[0, -1]
    assert max_diff(nxt[0], ref) < TOL


@pytest.mark.parametrize("int8", [False, True])
def test_server_engine_greedy_equals_generate(int8: bool) -> None:
    from qwen.serve.engine import Engine, RequestParams
    from serve_helpers import submit_together

    class Tok:  # the engine needs only decoding
        eod_id = im_end_id = im_start_id = 0

        def decode(self, ids, **kw):  # type: ignore[no-untyped-def]
            return "".join(chr(65 + i % 26) for i in ids)

    model = windowed(6, layers=2, vocab_size=1000, max_position_embeddings=512, use_cache_quantization=int8)
    prompts = [torch.randint(1, 1000, (n,)).tolist() for n in (3, 25, 90, 12)]
    params = RequestParams(max_new_tokens=80, ignore_eos=True)
    refs = [model.generate(torch.tensor([p]), max_new_tokens=80, do_sample=False, eos_token_id=None)[0, len(p):]
            .tolist() for p in prompts]
    with Engine(model, Tok(), max_batch_size=4, prefill_chunk=16) as eng:
        alone = [eng.generate(p, params)[1] for p in prompts]
        together = submit_together(eng, prompts, params)
    assert alone == refs and together == refs


# ------------------------------------------------------------------------------------------- perplexity
def test_perplexity_window_setting() -> None:
    from qwen.eval.perplexity import SETTINGS, perplexity_by_length

    assert list(SETTINGS) == ["plain", "ntk", "ntk+logn", "ntk+logn+window"]
    model = make_model(seq_length=32)
    tokens = torch.randint(0, 512, (300,)).tolist()
    res = perplexity_by_length(model, tokens, [32, 128], windows=2, progress=False)["perplexity"]
    assert res["ntk+logn+window"][32] == pytest.approx(res["ntk+logn"][32], rel=1e-6)  # window 32 covers it
    assert res["ntk+logn+window"][128] != pytest.approx(res["ntk+logn"][128], rel=1e-6)
    assert not model.config.use_window_attn and model.config.window_size is None  # restored
    small = perplexity_by_length(model, tokens, [64], windows=1, settings=["ntk+logn+window"], window_size=8,
                                 progress=False)["perplexity"]["ntk+logn+window"][64]
    ref_model = make_model(seq_length=32, use_window_attn=True, window_size=8, window_layers=2)
    ids = torch.tensor(tokens[:64])
    logits = reference_forward(ref_model, ids[None])[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, ids[1:])
    assert small == pytest.approx(math.exp(nll.item()), rel=1e-4)


# ------------------------------------------------------------------ users of cache rewinds and exporters
def test_chat_session_falls_back_to_a_fresh_cache_when_the_ring_wrapped() -> None:
    from qwen.chat import ChatSession
    from qwen.tokenizer import QWenTokenizer

    tok = QWenTokenizer.from_pretrained("qwen-demo")
    model = windowed(8, vocab_size=151936)
    session = ChatSession(model, tok, system="s")
    fresh = ChatSession(model, tok, system="s", reuse_cache=False)
    for query in ["hello there, how are you", "tell me more about it please", "and once again"]:
        assert session.send(query, do_sample=False, max_new_tokens=6) == fresh.send(query, do_sample=False,
                                                                                    max_new_tokens=6)


def test_prefix_cache_scoring_declines_when_a_window_is_shorter_than_the_prompt() -> None:
    from qwen.eval.multiple_choice import score_prompts, score_with_prefix_cache
    from qwen.tokenizer import QWenTokenizer

    tok = QWenTokenizer.from_pretrained("qwen-demo")
    model = windowed(8, vocab_size=151936)
    ids = [tok.encode(c)[0] for c in "ABCD"]
    assert score_with_prefix_cache(model, tok, "a long shared few-shot prefix, " * 3, ["q1 a", "q2 b"], ids) is None
    wide = windowed(512, vocab_size=151936)
    short = score_with_prefix_cache(wide, tok, "prefix\n\n", ["q1", "q2"], ids)
    whole = score_prompts(wide, tok, ["prefix\n\nq1", "prefix\n\nq2"], ids)
    assert short is not None and max(abs(a - b) for x, y in zip(short, whole) for a, b in zip(x, y)) < 1e-4


def test_exporters_refuse_windowed_models(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from qwen.export_gguf import GGUFExportError, export_gguf
    from qwen.interop import to_transformers_qwen2

    model = windowed(8)
    with pytest.raises(ValueError, match="window attention"):
        to_transformers_qwen2(model)
    model.save_pretrained(tmp_path / "w")
    with pytest.raises(GGUFExportError, match="use_window_attn is set"):
        export_gguf(str(tmp_path / "w"), tmp_path / "w.gguf", type="f32", progress=False)
