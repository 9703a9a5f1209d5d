"""KV-cache int8 (``use_cache_quantization``, spec §5): the official quantizer on hand-checked tensors,
the round mode, the int8 caches (KVCache, RowKVCache, legacy tuples) and the demo model end to end:
logits, greedy tokens, chunked perplexity, cache bytes, batching, ChatSession and the serve engine."""

from __future__ import annotations

import math
import threading
import warnings

import pytest
import torch

from qwen import AutoModelForCausalLM, AutoTokenizer
from qwen.cache import (
    KVCache,
    KVQuantizer,
    RowKVCache,
    dequantize_cache,
    quantize_cache_official,
    quantize_cache_round,
)
from qwen.chat import ChatSession, chat
from qwen.chat_template import render_messages
from qwen.config import ConfigError, QWenConfig, preset_config
from qwen.serve.engine import Engine, RequestParams

QMIN32, QMAX32 = torch.tensor(0.0), torch.tensor(255.0)


def official(x: torch.Tensor, qdtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return quantize_cache_official(x, torch.tensor(0, dtype=qdtype), torch.tensor(255, dtype=qdtype))


# ---------------------------------------------------------------------------------- the official quantizer
def test_official_quantizer_hand_checked_per_head_scale_unrounded_zero_and_truncation() -> None:
    # One batch row, two heads, a chunk of T=2 tokens of d=2: one scale/zero per head for the chunk.
    x = torch.tensor([[[[-0.01171875, 0.0], [0.5, 1.98046875]],  # head 0: min -1.5/128, max 253.5/128
                       [[-1.0, 0.75], [10.5, 254.0]]]])          # head 1: min -1, max 254
    q, scale, zero = official(x)
    # head 0: scale = (253.5 + 1.5)/128/255 = 1/128; zero = 0 - (-1.5/128)/(1/128) = 1.5, NOT rounded to 2.
    #   x/scale + zero = [0, 1.5, 65.5, 255] -> truncated [0, 1, 65, 255] (rounding would give 2 and 66).
    # head 1: scale = 255/255 = 1; zero = 1; x + 1 = [0, 1.75, 11.5, 255] -> [0, 1, 11, 255].
    assert q.dtype == torch.uint8
    assert q.tolist() == [[[[0, 1], [65, 255]], [[0, 1], [11, 255]]]]
    assert scale.shape == zero.shape == (1, 2, 2, 1)  # repeated along time (spec §5.1 step 6)
    assert scale.tolist() == [[[[1 / 128], [1 / 128]], [[1.0], [1.0]]]]
    assert zero.tolist() == [[[[1.5], [1.5]], [[1.0], [1.0]]]]
    # Dequantize: scale * (q - zero). Truncation biases every value down by up to one step.
    assert dequantize_cache(q, scale, zero).tolist() == [[[[-0.01171875, -0.00390625], [0.49609375, 1.98046875]],
                                                          [[-1.0, 0.0], [10.0, 254.0]]]]


def test_official_truncation_loses_the_maximum_in_fp32() -> None:
    x = torch.tensor([0.0, 0.5, 1.0, 0.875]).view(1, 1, 2, 2)
    q, scale, zero = official(x)
    # scale = fp32(1/255) = 0.003921568859..., a hair above 1/255, so x/scale falls a hair short:
    # 0.5 -> 127.49999 -> 127, 1.0 -> 254.99998 -> 254 (the chunk's max never reaches 255), 0.875 -> 223.12498 -> 223.
    assert scale[0, 0, 0, 0].item() == pytest.approx(0.003921568859368563, abs=0) and zero.abs().max().item() == 0
    assert q.flatten().tolist() == [0, 127, 254, 223]


def test_official_dtype_follows_the_activations_not_qmin_qmax() -> None:
    # The same (bf16-exact) values in a bf16 model: scale/zero/x/scale + zero are all computed in bf16.
    x = torch.tensor([0.0, 0.5, 1.0, 0.875], dtype=torch.bfloat16).view(1, 1, 2, 2)
    q, scale, zero = official(x, torch.bfloat16)
    # bf16(1/255) = 2^-8 * (1 + 1/128) = 129/32768 = 0.003936767578125 (8 significant bits).
    # 1/scale = 32768/129 = 254.02 -> 254; 0.5/scale = 127.01 -> 127; 0.875/scale = 222.26 -> 222, one less than
    # in fp32 (223): the coarser bf16 scale moves the grid.
    assert scale.dtype == zero.dtype == torch.bfloat16
    assert scale[0, 0, 0, 0].item() == 129 / 32768
    assert q.flatten().tolist() == [0, 127, 254, 222]
    assert dequantize_cache(q, scale, zero).dtype == torch.bfloat16
    # The 0-d qmin/qmax tensors (bf16/fp16/fp32 per config.bf16/fp16) never promote the dimensioned
    # activations: for a given input dtype their dtype changes nothing.
    for xs in (x, x.float()):
        ref = official(xs, torch.float32)
        for qd in (torch.bfloat16, torch.float16):
            got = official(xs, qd)
            assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, ref))
    # The quantizer a model builds takes qmin/qmax dtypes from the config flags, as the official constructor.
    cfg = preset_config("tiny-vocab", use_cache_quantization=True, cache_quantization_mode="official")
    assert KVQuantizer.from_config(cfg, torch.float32).qmax.dtype == torch.float32
    cfg_bf16 = preset_config("tiny-vocab", use_cache_quantization=True, cache_quantization_mode="official", bf16=True)
    qz = KVQuantizer.from_config(cfg_bf16, torch.bfloat16)
    assert qz.qmax.dtype == qz.qmin.dtype == torch.bfloat16 and qz.param_dtype == torch.bfloat16
    assert KVQuantizer.from_config(preset_config("tiny-vocab"), torch.float32) is None


def test_official_constant_chunk_is_nan_round_is_exact() -> None:
    c = torch.full((1, 2, 3, 4), 0.7)
    c[:, 1] = 0.0
    assert torch.isnan(dequantize_cache(*official(c))).all()  # 0/0 as in the official code: no guard
    q, scale, zero = quantize_cache_round(c)
    assert torch.equal(dequantize_cache(q, scale, zero), c)  # scale 1, q 0, zero -value: exact
    assert torch.isfinite(scale).all() and torch.isfinite(zero).all()


# ---------------------------------------------------------------------------------- the round mode
def test_round_mode_is_more_accurate_and_per_token() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 64, generator=g) * 3
    x[:, :, 0] *= 8  # an outlier token (the first token's keys often are): official coarsens the whole chunk
    err_official = (dequantize_cache(*official(x)) - x).abs().mean().item()
    q, scale, zero = quantize_cache_round(x)
    err_round = (dequantize_cache(q, scale, zero) - x).abs().mean().item()
    print(f"mean |error|: official {err_official:.5f}, round {err_round:.5f}")
    assert err_round < err_official / 4
    # Without the outlier, rounding alone still halves the (biased) truncation error.
    y = torch.randn(2, 4, 1, 64, generator=g)
    e_off = (dequantize_cache(*official(y)) - y).abs().mean().item()
    e_round = (dequantize_cache(*quantize_cache_round(y)) - y).abs().mean().item()
    assert e_round < 0.6 * e_off
    # Per token: a chunk quantizes as its tokens one by one (prefill == decode, pads do not leak).
    parts = [quantize_cache_round(x[:, :, t:t + 1]) for t in range(x.shape[2])]
    for whole, part in zip((q, scale, zero), zip(*parts)):
        assert torch.equal(whole, torch.cat(part, dim=2))
    assert scale.dtype == torch.float32 and quantize_cache_round(x.bfloat16())[1].dtype == torch.float32


# ---------------------------------------------------------------------------------- caches
def tiny_model(mode: str = "round", **kw) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    from qwen.model import QWenLMHeadModel

    m = QWenLMHeadModel(preset_config("tiny-vocab", use_cache_quantization=True, cache_quantization_mode=mode, **kw))
    m.init_weights(seed=3)
    return m.eval()


def test_official_cache_stores_exactly_the_official_tensors_concatenated() -> None:
    model = tiny_model("official")
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids[:, :6])
        out = model(ids[:, 6:7], past_key_values=out.past_key_values)
        cache = out.past_key_values
    assert cache.keys[0].dtype == torch.uint8 and cache.key_scales[0].shape[-1] == 1
    # The official cache layout: ((qK, scale, zero), (qV, scale, zero)), [B, h, S, .], S on dim 2.
    (qk, sk, zk), (qv, sv, zv) = cache.to_legacy()[1]
    assert qk.shape == (2, 4, 7, 16) and sk.shape == zk.shape == (2, 4, 7, 1) and qv.dtype == torch.uint8
    assert len(cache) == 2 and cache[1][0][0].shape[2] == 7  # the official way to read the past length
    # Prefill slots share one scale per (row, head); the decode slot has its own (spec §5.1 step 2).
    assert (sk[:, :, :6] == sk[:, :, :1]).all() and not torch.equal(sk[:, :, 6], sk[:, :, 0])
    # Layer 0's K/V do not depend on the cache (embedding -> RoPE), so a float-cache twin gives the exact
    # inputs: the int8 cache must hold the official quantizer's output of each chunk (prefill, decode step).
    twin = tiny_model("official")
    twin.config.use_cache_quantization = False
    with torch.no_grad():  # the same chunks as above, so the float K/V are bit-identical
        ref = twin(ids[:, :6]).past_key_values
        twin(ids[:, 6:7], past_key_values=ref)
    (qk0, sk0, zk0), (qv0, sv0, zv0) = cache[0]
    for stored, f in (((qk0, sk0, zk0), ref.keys[0][:, :, :7]), ((qv0, sv0, zv0), ref.values[0][:, :, :7])):
        expect = [torch.cat(parts, dim=2) for parts in zip(official(f[:, :, :6]), official(f[:, :, 6:7]))]
        for got, want in zip(stored, expect):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    # Float tuples given to an int8 model are quantized as one chunk per layer (upstream crashes).
    with torch.no_grad():
        from_float = model(ids[:, 7:8], past_key_values=ref.to_legacy()).past_key_values
    for got, want in zip(from_float[0][0], official(ref.keys[0][:, :, :7])):
        torch.testing.assert_close(got[:, :, :7], want, atol=0, rtol=0)
    # Lossless legacy round trip: the next step's logits are identical.
    with torch.no_grad():
        a = model(ids[:, 7:9], past_key_values=cache.to_legacy()).logits
        b = model(ids[:, 7:9], past_key_values=cache).logits
    assert torch.equal(a, b)


def test_cache_update_matches_the_quantizer_and_returns_dequantized_kv() -> None:
    g = torch.Generator().manual_seed(2)
    for mode, dtype in (("official", torch.float32), ("official", torch.bfloat16), ("round", torch.float32),
                        ("round", torch.bfloat16)):
        qz = KVQuantizer(mode, dtype, dtype)
        cache = KVCache(1, 2, 3, 8, capacity=4, dtype=dtype, quantizer=qz)  # capacity 4: the second chunk grows it
        k1, v1 = (torch.randn(2, 3, 3, 8, generator=g).to(dtype) for _ in range(2))
        k2, v2 = (torch.randn(2, 3, 2, 8, generator=g).to(dtype) for _ in range(2))
        cache.begin(None, 3)
        cache.update(0, k1, v1)
        cache.commit(3, torch.full((2,), 3))
        cache.begin(None, 2)
        k, v = cache.update(0, k2, v2)
        cache.commit(2, torch.full((2,), 2))
        # The spec's formula scale * (q - zero), bit for bit, in the activation dtype.
        expect_k = torch.cat([dequantize_cache(*qz.quantize(k1)), dequantize_cache(*qz.quantize(k2))], dim=2)
        expect_v = torch.cat([dequantize_cache(*qz.quantize(v1)), dequantize_cache(*qz.quantize(v2))], dim=2)
        assert torch.equal(k, expect_k.to(dtype)) and torch.equal(v, expect_v.to(dtype)) and k.dtype == dtype
        assert cache.capacity >= 5 and cache.length == 5
        # select_rows and crop keep the int8 storage consistent.
        cache.select_rows([1])
        assert cache.keys[0].shape[0] == cache.key_scales[0].shape[0] == 1
        cache.crop(3)
        assert cache[0][0][0].shape == (1, 3, 3, 8)


def test_nbytes_shrinks() -> None:
    shape = dict(num_layers=2, batch_size=3, num_heads=4, capacity=100)
    for d in (32, 128):
        fp32 = KVCache(head_dim=d, dtype=torch.float32, **shape).nbytes()
        bf16 = KVCache(head_dim=d, dtype=torch.bfloat16, **shape).nbytes()
        int8 = KVCache(head_dim=d, dtype=torch.float32, quantizer=KVQuantizer("round"), **shape).nbytes()
        int8_bf16 = KVCache(head_dim=d, dtype=torch.bfloat16,
                            quantizer=KVQuantizer("official", torch.bfloat16, torch.bfloat16), **shape).nbytes()
        per_slot = 2 * 2 * 3 * 4 * 100  # K and V, layers, rows, heads, slots
        assert int8 == per_slot * (d + 2 * 4)  # uint8 values + fp32 scale and zero
        assert int8_bf16 == per_slot * (d + 2 * 2)  # official in a bf16 model: bf16 scale and zero
        print(f"head_dim {d}: fp32 {fp32}, bf16 {bf16}, int8 {int8} ({fp32 / int8:.2f}x smaller than fp32, "
              f"{bf16 / int8:.2f}x than bf16)")
        assert fp32 / int8 >= (3.2 if d == 32 else 3.7)


def test_row_cache_int8_matches_kv_cache_decode() -> None:
    for mode in ("official", "round"):
        model = tiny_model(mode)
        g = torch.Generator().manual_seed(4)
        prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 11, 2)]
        rows = RowKVCache(model, max_rows=4, capacity=4)
        assert rows.keys[0].dtype == torch.uint8
        refs = []
        with torch.no_grad():
            for p in prompts:
                cache = model.new_cache(1, len(p))
                model(torch.tensor([p]), past_key_values=cache)
                rows.insert(cache)
                ref_cache = model.new_cache(1, len(p))
                model(torch.tensor([p]), past_key_values=ref_cache)
                refs.append([model(torch.tensor([[t]]), past_key_values=ref_cache).logits[0, -1] for t in (7, 8)])
            got = [model(torch.tensor([[t]] * 3), past_key_values=rows).logits[:, -1] for t in (7, 8)]
            # Batched and single-row matmuls round differently (~1e-7), which can move one value across a
            # quantization step boundary: equal up to that, not bit for bit.
            for i in range(3):
                for step in range(2):
                    torch.testing.assert_close(got[step][i], refs[i][step], atol=1e-3, rtol=1e-3)
            assert rows.remove(0) == 2 and rows.rows == 2
        # A float cache cannot enter an int8 row cache.
        with pytest.raises(ValueError, match="quantizer"):
            rows.insert(KVCache(2, 1, 4, 16, 4))


def test_config_field_and_kernel_flag() -> None:
    with pytest.raises(ConfigError, match="cache_quantization_mode"):
        preset_config("tiny-vocab", cache_quantization_mode="nearest")
    cfg = preset_config("tiny-vocab")
    assert cfg.cache_quantization_mode == "round" and "cache_quantization_mode" not in cfg.to_dict()
    assert cfg.update(cache_quantization_mode="official").to_dict()["cache_quantization_mode"] == "official"
    assert QWenConfig.from_dict(cfg.update(cache_quantization_mode="official").to_dict()).cache_quantization_mode \
        == "official"
    import qwen.cache as cache_module

    cache_module._kernel_warned = False
    model = tiny_model("round", use_cache_kernel=True, use_flash_attn=True)  # upstream needs use_flash_attn=False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
            model(torch.tensor([[1, 2, 3]]))
    assert sum("use_cache_kernel" in str(w.message) for w in caught) == 1  # accepted, warned once
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


# ---------------------------------------------------------------------------------- the demo model
PROMPTS = ["The capital of France is", "床前明月光，", "Shall I compare thee to a summer's day?",
           "12+34=", "What is the capital of Japan?", "人民日报"]

TEXT = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.

The capital of France is Paris. The capital of Japan is Tokyo. The capital of Peru is Lima.
Twelve plus thirty-four is forty-six, and sixty minus thirteen is forty-seven.
A fool thinks himself to be wise, but a wise man knows himself to be a fool.

床前明月光，疑是地上霜。举头望明月，低头思故乡。
白日依山尽，黄河入海流。欲穷千里目，更上一层楼。
新华社北京一月一日电，今天是新年的第一天，首都各界人士举行集会，庆祝新年的到来。"""


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained("qwen-demo")


@pytest.fixture(scope="module")
def demo_models():  # type: ignore[no-untyped-def]
    load = lambda **kw: AutoModelForCausalLM.from_pretrained("qwen-demo", progress=False, **kw)  # noqa: E731
    return {"fp": load(), "round": load(use_cache_quantization=True),
            "official": load(use_cache_quantization=True, cache_quantization_mode="official")}


def chunked_logits(model, ids: torch.Tensor, chunk: int = 16) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Logits of every position, fed ``chunk`` tokens at a time through one cache (so K/V come from it)."""
    cache = model.new_cache(1, ids.shape[1])
    with torch.no_grad():
        parts = [model(ids[:, s:s + chunk], past_key_values=cache).logits for s in range(0, ids.shape[1], chunk)]
    return torch.cat(parts, dim=1).float()


def test_from_pretrained_kwarg_makes_an_int8_cache(demo_models) -> None:  # type: ignore[no-untyped-def]
    m = demo_models["round"]
    assert m.config.use_cache_quantization and m.config.cache_quantization_mode == "round"
    assert demo_models["official"].config.cache_quantization_mode == "official"
    cache = m.new_cache(1, 8)
    assert cache.keys[0].dtype == torch.uint8 and cache.quantizer is not None and cache.quantizer.mode == "round"
    assert demo_models["fp"].new_cache(1, 8).quantizer is None


def test_chunked_perplexity_changes_less_than_one_percent(demo_models, tok) -> None:  # type: ignore[no-untyped-def]
    ids = torch.tensor([tok.encode(TEXT)])
    ppl = {}
    for name, model in demo_models.items():
        logits = chunked_logits(model, ids)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        ppl[name] = math.exp(loss.item())
    print(f"\n{ids.shape[1]} tokens, 16-token chunks: perplexity fp {ppl['fp']:.4f}, int8 official "
          f"{ppl['official']:.4f} ({100 * (ppl['official'] / ppl['fp'] - 1):+.3f}%), int8 round {ppl['round']:.4f} "
          f"({100 * (ppl['round'] / ppl['fp'] - 1):+.3f}%)")
    for name in ("official", "round"):
        assert abs(ppl[name] / ppl["fp"] - 1) <= 0.01


def test_logits_close_and_greedy_tokens_match(demo_models, tok) -> None:  # type: ignore[no-untyped-def]
    ids = torch.tensor([tok.encode(TEXT)])[:, :200]
    ref = chunked_logits(demo_models["fp"], ids)
    scale = ref.abs().max().item()
    for name in ("official", "round"):
        diff = (chunked_logits(demo_models[name], ids) - ref).abs().max().item()
        print(f"{name}: max |logit difference| {diff:.4f} (logits up to {scale:.1f})")
        assert diff < 0.05 * scale  # a few percent of the logit range
    matched = {"official": 0, "round": 0}
    total = 0
    for p in PROMPTS:
        pids = torch.tensor([tok.encode(p)])
        ref_tokens = demo_models["fp"].generate(pids, max_new_tokens=24, do_sample=False,
                                                repetition_penalty=1.0)[0, pids.shape[1]:].tolist()
        total += len(ref_tokens)
        for name in matched:
            got = demo_models[name].generate(pids, max_new_tokens=24, do_sample=False,
                                             repetition_penalty=1.0)[0, pids.shape[1]:].tolist()
            # Tokens agree up to the first divergence; count the common prefix.
            matched[name] += next((i for i, (a, b) in enumerate(zip(got, ref_tokens)) if a != b), len(ref_tokens))
    print(f"greedy tokens equal to the float cache's (common prefix), {len(PROMPTS)} prompts: "
          f"official {matched['official']}/{total}, round {matched['round']}/{total}")
    assert matched["round"] >= 0.8 * total and matched["official"] >= 0.6 * total


def test_left_padded_batch_equals_single_rows_in_round_mode(demo_models, tok) -> None:  # type: ignore[no-untyped-def]
    model = demo_models["round"]
    prompts = [tok.encode(p) for p in PROMPTS[:4]]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=None)
        want = alone[0, len(p):].tolist()
        assert batch[i, width:width + len(want)].tolist() == want  # a row stopped early is padded after


def test_chat_and_session_reuse_with_an_int8_cache(demo_models, tok) -> None:  # type: ignore[no-untyped-def]
    model = demo_models["round"]
    greedy = dict(do_sample=False, max_new_tokens=12)
    session = ChatSession(model, tok, generation_config=dict(model.generation_config.to_dict(), **greedy))
    r1 = session.send("你好")
    r2 = session.send("法国的首都是哪里？")
    assert session.last_response.cached_tokens > 0  # the int8 cache was cropped and reused
    ref1, hist = chat(model, tok, "你好", **greedy)
    ref2, _ = chat(model, tok, "法国的首都是哪里？", history=hist, **greedy)
    # Round mode quantizes per token: a reused prefix holds the very values a fresh prefill would.
    assert (r1, r2) == (ref1, ref2) and r1


@pytest.mark.parametrize("mode", ["round", "official"])
def test_serve_engine_concurrent_equals_alone(demo_models, tok, mode: str) -> None:  # type: ignore[no-untyped-def]
    model = demo_models[mode]
    questions = ["你好", "What is the capital of France?", "12+34等于多少？", "Who are you?", "日本的首都是哪里？"]
    prompts = [render_messages(tok, [{"role": "user", "content": q}])[0] for q in questions]
    params = RequestParams(max_new_tokens=16, stop_token_ids=[tok.im_end_id, tok.im_start_id, tok.eod_id])
    with Engine(model, tok, max_batch_size=8) as engine:
        assert engine._cache.keys[0].dtype == torch.uint8
        alone = [engine.generate(p, params) for p in prompts]
        out: list = [None] * len(prompts)
        barrier = threading.Barrier(len(prompts))

        def worker(i: int) -> None:
            barrier.wait()
            out[i] = engine.generate(prompts[i], params)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [o[1] for o in out] == [a[1] for a in alone]
    # And the engine (int8 rows) gives generate()'s greedy tokens.
    ref = model.generate(torch.tensor([prompts[1]]), max_new_tokens=16, do_sample=False,
                         repetition_penalty=1.0)[0, len(prompts[1]):].tolist()
    assert alone[1][1] == ref[: len(alone[1][1])]
