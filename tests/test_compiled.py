"""The compiled generation path (qwen/compiled.py) against the eager model, and generate(compile=...).

Fast tier: the static-shape graphs traced by torch._dynamo with the "eager" backend (the graph logic:
static cache, slot/position tensors, masks, NTK table, ring buffers, int8 storage; recompile counts)
and generate()'s compiled token loop. Slow tier: the same through inductor's CPU backend. GPU tier
(``-m gpu``, skipped without CUDA): inductor with CUDA graphs (mode "reduce-overhead").

Each comparison teacher-forces the eager greedy tokens into both paths, so one near-tie cannot make
the rest of the sequence incomparable, and checks that the compiled path's argmax is the eager token
at every step. Logit tolerance: max |difference| / max |logit| over prefill + 64 decode steps, 1e-5 in
fp32 (only summation order differs: attention over the whole static cache with masked slots, fused
kernels); 1e-3 for the official int8 KV mode, whose truncation turns a last-bit difference in a key
into a whole quantization step.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import torch

from qwen import compiled
from qwen.compiled import CompiledDecoder, capacity_for, compile_model, ntk_alpha_index, prefill_buckets
from qwen.config import ntk_alpha, preset_config
from qwen.generate import generate, generate_step
from qwen.model import QWenLMHeadModel

DECODE_STEPS = 64
TOL = 1e-5
TOL_OFFICIAL_INT8 = 1e-3
GPU = torch.cuda.is_available()

# tiny-vocab: seq_length 64, dynamic NTK and LogN on. A 40-token prompt + 64 steps crosses seq_length
# while decoding (LogN factors > 1 from position 64 on); a 100-token prompt starts with alpha 3.
SETTINGS = {
    "ntk+logn": dict(prompt=40),
    "ntk-alpha-3": dict(prompt=100),
    "kv-int8-round": dict(prompt=40, use_cache_quantization=True),
    "kv-int8-official": dict(prompt=40, use_cache_quantization=True, cache_quantization_mode="official"),
    "window": dict(prompt=40, use_window_attn=True, window_size=20, num_hidden_layers=4),
    "window+int8": dict(prompt=100, use_window_attn=True, window_size=24, use_cache_quantization=True),
}


def make_model(seed: int = 0, **overrides: Any) -> QWenLMHeadModel:
    torch.manual_seed(seed)
    model = QWenLMHeadModel(preset_config("tiny-vocab", **overrides))
    model.init_weights(seed=seed)
    return model.eval()


def model_for(setting: str) -> tuple[QWenLMHeadModel, int]:
    kw = dict(SETTINGS[setting])
    prompt = kw.pop("prompt")
    return make_model(**kw), prompt


@torch.no_grad()
def eager_run(model: QWenLMHeadModel, ids: torch.Tensor, steps: int,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [B, steps] and the logits [B, steps + 1, V] they came from, through model(...)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits, tokens = [out.logits[:, -1].float()], []
    for _ in range(steps):
        tok = logits[-1].argmax(-1)
        tokens.append(tok)
        out = model(tok[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits.append(out.logits[:, -1].float())
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@torch.no_grad()
def forced_run(decoder: CompiledDecoder, ids: torch.Tensor, tokens: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's logits [B, steps + 1, V] along the given token sequence (teacher forcing)."""
    dev = decoder.device
    logits = [decoder.prefill(ids.to(dev), None if mask is None else mask.to(dev)).cpu()]
    for j in range(tokens.shape[1]):
        logits.append(decoder.decode(tokens[:, j].to(dev)).cpu())
    return torch.stack(logits, 1)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def check_against_eager(model: QWenLMHeadModel, decoder: CompiledDecoder, ids: torch.Tensor, tol: float,
                        mask: torch.Tensor | None = None) -> None:
    tokens, ref = eager_run(model, ids, DECODE_STEPS, mask)
    got = forced_run(decoder, ids, tokens, mask)
    assert rel_diff(got, ref) <= tol, rel_diff(got, ref)
    assert torch.equal(got[:, :-1].argmax(-1), tokens), "the compiled path's greedy tokens differ from eager"


# ------------------------------------------------------------------------------------------------- fast tier
def test_ntk_alpha_index_is_the_config_formula() -> None:
    for seq_length in (64, 8192):
        lengths = torch.arange(0, seq_length * 40 + 1)
        k = ntk_alpha_index(lengths, seq_length, entries=7)
        alphas = torch.where(k == 0, torch.ones_like(k), 2 ** (k + 1) - 1)
        expected = torch.tensor([ntk_alpha(int(n), seq_length) for n in lengths])
        assert torch.equal(alphas, expected)


def test_buckets_and_capacity() -> None:
    assert prefill_buckets(256) == [16, 32, 64, 128, 255]
    for prompt, new in [(1, 1), (15, 240), (17, 300), (1000, 10), (40, 64)]:
        cap = capacity_for(prompt, new)
        bucket = next(n for n in prefill_buckets(cap) if n >= prompt)
        assert bucket + new <= cap and cap >= 256 and cap & (cap - 1) == 0


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_static_graphs_equal_eager(setting: str) -> None:
    """Prefill + 64 decode steps through the dynamo-traced graphs ("eager" backend) equal the eager model."""
    model, prompt = model_for(setting)
    ids = torch.randint(0, 512, (1, prompt), generator=torch.Generator().manual_seed(1))
    decoder = compile_model(model, 1, 256, backend="eager")
    tol = TOL_OFFICIAL_INT8 if "official" in setting else TOL
    check_against_eager(model, decoder, ids, tol)
    assert decoder.compilations == {"prefill": 1, "decode": 1}


def test_left_padded_batch_with_one_alpha_per_row() -> None:
    """Rows of 100 and 30 real tokens (NTK alpha 3 and 1), left-padded, each as the eager batch computes it."""
    model = make_model()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 512, (2, 100), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :70] = 0
    decoder = compile_model(model, 2, 256, backend="eager")
    check_against_eager(model, decoder, ids, TOL, mask)
    assert decoder.cache.inv_freq[0].ne(decoder.cache.inv_freq[1]).any()  # two alphas


@pytest.mark.parametrize("setting", ["ntk+logn", "kv-int8-official"])
def test_fewer_rows_than_max_batch_size_are_completed_with_empty_rows(setting: str) -> None:
    model, _ = model_for(setting)
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(3))
    decoder = compile_model(model, 4, 256, backend="eager")
    check_against_eager(model, decoder, ids, TOL_OFFICIAL_INT8 if "official" in setting else TOL)
    assert all(bool(torch.isfinite(s).all()) for s in decoder.cache.key_scales)  # empty rows too


def test_window_layers_keep_a_ring_of_window_slots() -> None:
    model = make_model(use_window_attn=True, window_size=20, num_hidden_layers=4)
    decoder = compile_model(model, 1, 256, compiled=False)
    assert [k.shape[2] for k in decoder.cache.keys] == [20, 20, 256, 256]
    mask = torch.tensor([[1, 1, 0, 1]])
    with pytest.raises(ValueError, match="contiguous"):
        decoder.prefill(torch.tensor([[1, 2, 3, 4]]), mask)


def test_recompilations_are_bounded() -> None:
    """One decode graph for every step; one prefill graph per bucket, whatever the prompt length in it."""
    model = make_model()
    decoder = compile_model(model, 1, 256, backend="eager")
    gen = torch.Generator().manual_seed(4)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    decoder.prefill(torch.randint(0, 512, (1, 20), generator=gen))
    tok = torch.tensor([1])
    decoder.decode(tok)
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(DECODE_STEPS - 1):  # NTK/LogN positions and the slot change, the graph does not
            tok = decoder.decode(tok).argmax(-1)
        decoder.prefill(torch.randint(0, 512, (1, 31), generator=gen))  # same bucket (32)
        for _ in range(8):
            tok = decoder.decode(tok).argmax(-1)
    assert decoder.compilations == {"prefill": 1, "decode": 1}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 2
    decoder.prefill(torch.randint(0, 512, (1, 40), generator=gen))  # bucket 64: its own graph
    assert decoder.compilations == {"prefill": 2, "decode": 1}


def test_packed_cpu_layers_are_refused_with_a_clear_error() -> None:
    from qwen.cpu_pack import pack_linear_layers

    model = make_model()
    pack_linear_layers(model)
    with pytest.raises(ValueError, match="cpu_packed_weights=False"):
        CompiledDecoder(model, 1, 64)
    CompiledDecoder(model, 1, 64, compiled=False)  # the uncompiled static path runs any module


def test_decoder_errors() -> None:
    model = make_model()
    decoder = compile_model(model, 1, 64, compiled=False)
    with pytest.raises(ValueError, match="does not fit"):
        decoder.prefill(torch.zeros(1, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="rows"):
        decoder.prefill(torch.zeros(2, 8, dtype=torch.long))
    decoder.prefill(torch.zeros(1, 63, dtype=torch.long))
    decoder.decode(torch.tensor([1]))
    with pytest.raises(ValueError, match="full"):
        decoder.decode(torch.tensor([1]))
    with pytest.raises(ValueError, match="eval"):
        CompiledDecoder(make_model().train(), 1, 64)


# ---------------------------------------------------------------------------------------------- generate()
@pytest.fixture
def eager_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """generate(compile=True) builds its decoders with the dynamo "eager" backend (fast on CPU)."""
    monkeypatch.setattr(compiled, "DEFAULT_OPTIONS", {"backend": "eager"})


def _eos_hit_by(model: QWenLMHeadModel, ids: torch.Tensor, mask: torch.Tensor) -> tuple[int, list[int]]:
    """An eos id and a two-token stop word such that row 0 ends on the eos and the last row on the stop
    word (its owed eos follows), at different steps, in the eager loop."""
    ref = generate(model, ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[], compile=False)[:, ids.shape[1]:]
    rows = ref.tolist()
    for e in range(2, 20):
        eos = rows[0][e]
        if eos in rows[0][:e]:
            continue
        for at in range(2, 26):
            stop = rows[-1][at: at + 2]
            tail0 = rows[0][: e + 1]
            early0 = any(tail0[i: i + 2] == stop for i in range(len(tail0) - 1))
            if at != e and eos not in rows[-1][: at + 2] and not early0:
                return eos, stop
    raise AssertionError("no eos / stop word found for this seed")


def test_generate_compiled_equals_eager(eager_backend: None) -> None:
    model = make_model()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 512, (3, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    mask[2, :20] = 0
    eos, stop = _eos_hit_by(model, ids, mask)
    cases = [
        dict(),
        dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=50, seed=7),
        dict(repetition_penalty=1.3, presence_penalty=0.5),
        dict(logits_processor=[lambda seq, scores: scores - 0.01 * seq.shape[1] * (torch.arange(512) == 3)]),
        dict(stopping_criteria=[lambda seq, scores: seq[:, -1] == 11]),
    ]
    for kw in cases:
        common = dict(attention_mask=mask, max_new_tokens=40, eos_token_id=[eos], pad_token_id=0,
                      stop_words_ids=[stop], return_dict_in_generate=True, **kw)
        a = generate(model, ids, compile=False, **common)
        b = generate(model, ids, compile=True, **common)
        assert torch.equal(a.sequences, b.sequences), kw
        assert a.finish_reasons == b.finish_reasons, kw
    assert len(compiled.decoders(model)) == 1  # every call above reused one decoder
    assert compiled.decoders(model)[0].compilations == {"prefill": 1, "decode": 1}


def test_a_decoder_is_reused_by_requests_it_fits(eager_backend: None) -> None:
    model = make_model()
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(12))
    generate(model, ids, max_new_tokens=300, eos_token_id=[], compile=True)  # 512 slots
    for new in (1, 5, 50):
        generate(model, ids[:, :10], max_new_tokens=new, eos_token_id=[], compile=True)
    (decoder,) = compiled.decoders(model)
    assert decoder.max_seq_len == 512 and decoder.compilations == {"prefill": 2, "decode": 1}  # buckets 16, 32
    generate(model, ids, max_new_tokens=600, eos_token_id=[], compile=True)  # does not fit: a second decoder
    assert [d.max_seq_len for d in compiled.decoders(model)] == [512, 1024]
    model = make_model()
    generate(model, torch.cat([ids, ids.flip(1)]), max_new_tokens=5, eos_token_id=[], compile=True)
    out = generate(model, ids, max_new_tokens=5, eos_token_id=[], compile=True)  # 1 row on the 2-row decoder
    assert [(d.max_batch_size, d.max_seq_len) for d in compiled.decoders(model)] == [(2, 256)]
    assert torch.equal(out, generate(model, ids, max_new_tokens=5, eos_token_id=[], compile=False))


def test_decoders_live_and_die_with_their_model(eager_backend: None) -> None:
    import copy
    import gc
    import pickle
    import weakref

    model = make_model()
    generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4, eos_token_id=[], compile=True)
    (decoder,) = compiled.decoders(model)
    assert not compiled.decoders(copy.deepcopy(model))
    assert not compiled.decoders(pickle.loads(pickle.dumps(model)))
    cache, model_ref = weakref.ref(decoder.cache.keys[0]), weakref.ref(model)
    del decoder, model
    gc.collect()
    assert cache() is None and model_ref() is None  # torch._dynamo's caches keep neither alive


@pytest.mark.parametrize("sync_every", [1, 3, 64])
def test_generate_step_yields_what_the_eager_loop_yields(eager_backend: None, sync_every: int) -> None:
    model = make_model()
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    eos, stop = _eos_hit_by(model, ids, mask)
    kw = dict(max_new_tokens=30, eos_token_id=[eos], pad_token_id=0, stop_words_ids=[stop])
    a = list(generate_step(model, ids, mask, compile=False, **kw))
    b = list(generate_step(model, ids, mask, compile=True, sync_every=sync_every, **kw))
    assert len(a) == len(b) and len(a) < 30  # both rows finished early
    live = torch.ones(2, dtype=torch.bool)
    for x, y in zip(a, b):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.finished, y.finished)
        assert x.finish_reasons == y.finish_reasons
        assert (x.scores is None) == (y.scores is None)
        if x.scores is not None:  # a finished row's scores are not meaningful (eager feeds it pads)
            assert rel_diff(y.scores[live], x.scores[live]) <= TOL
        live = ~x.finished


def test_streamer_gets_the_same_tokens(eager_backend: None) -> None:
    class Collect:
        def __init__(self) -> None:
            self.parts: list[list[int]] = []

        def put(self, value: torch.Tensor) -> None:
            self.parts.append(value.reshape(-1).tolist())

        def end(self) -> None:
            self.parts.append([-1])

    model = make_model()
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(8))
    streams = []
    for flag in (False, True):
        s = Collect()
        generate(model, ids, max_new_tokens=20, eos_token_id=[], streamer=s, compile=flag)
        streams.append(s.parts)
    assert streams[0] == streams[1]


def test_compile_false_is_the_eager_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile=False (and "auto" on the CPU) never builds a decoder and gives the eager tokens bit for bit."""
    model = make_model()

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the compiled path was used")

    monkeypatch.setattr(compiled.CompiledDecoder, "__init__", refuse)
    monkeypatch.delenv(compiled.COMPILE_ENV, raising=False)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(9))
    tokens, _ = eager_run(model, ids, 24)
    for flag in (False, "auto"):
        out = generate(model, ids, max_new_tokens=24, eos_token_id=[], compile=flag)
        assert torch.equal(out[:, 16:], tokens)
    monkeypatch.setenv(compiled.COMPILE_ENV, "0")
    assert not compiled.wants_compile(model, "auto")
    monkeypatch.setenv(compiled.COMPILE_ENV, "1")
    assert compiled.wants_compile(model, "auto")
    assert not compiled.wants_compile(model, "auto", cache=model.new_cache(1, 8))  # a caller's cache: eager
    with pytest.raises(ValueError, match="cache"):
        compiled.wants_compile(model, True, cache=model.new_cache(1, 8))
    with pytest.raises(ValueError, match="compile must be"):
        compiled.wants_compile(model, "yes")


def test_the_fused_c_decode_step_still_runs_by_default_on_cpu() -> None:
    from qwen import kernels

    if not kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.why_unavailable()}")
    model = make_model()
    generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4, eos_token_id=[])
    assert model.transformer._fused is not None and not compiled.decoders(model)


def test_auto_falls_back_to_eager_when_compiling_fails(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    def broken(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(compiled, "DEFAULT_OPTIONS", {"backend": broken})
    monkeypatch.setenv(compiled.COMPILE_ENV, "1")
    model = make_model()
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(10))
    tokens, _ = eager_run(model, ids, 8)
    out = generate(model, ids, max_new_tokens=8, eos_token_id=[], compile="auto")
    assert torch.equal(out[:, 16:], tokens)
    assert "generating eagerly" in caplog.text and not compiled.wants_compile(model, "auto")
    with pytest.raises(Exception, match="no compiler here"):
        generate(make_model(), ids, max_new_tokens=8, eos_token_id=[], compile=True)


def test_concurrent_generations_do_not_share_a_static_cache(eager_backend: None) -> None:
    model = make_model()
    gen = torch.Generator().manual_seed(11)
    a_ids, b_ids = torch.randint(0, 512, (1, 12), generator=gen), torch.randint(0, 512, (1, 14), generator=gen)
    kw = dict(max_new_tokens=20, eos_token_id=[5000], compile=True, sync_every=1)
    first, second = generate_step(model, a_ids, **kw), generate_step(model, b_ids, **kw)
    a_steps, b_steps = [], []
    for x, y in zip(first, second):  # interleaved: the second runs on a private decoder
        a_steps.append(x.tokens)
        b_steps.append(y.tokens)
    assert torch.equal(torch.stack(a_steps, 1), eager_run(model, a_ids, 20)[0])
    assert torch.equal(torch.stack(b_steps, 1), eager_run(model, b_ids, 20)[0])
    assert not any(d.busy for d in compiled.decoders(model))


# ------------------------------------------------------------------------------------------------- slow tier
@pytest.mark.slow
@pytest.mark.parametrize("setting", ["ntk+logn", "kv-int8-round", "window+int8"])
def test_inductor_cpu_equals_eager(setting: str) -> None:
    """Inductor's CPU backend (C++ kernels): prefill + 64 decode steps; no recompilation per token."""
    model, prompt = model_for(setting)
    ids = torch.randint(0, 512, (1, prompt), generator=torch.Generator().manual_seed(1))
    decoder = compile_model(model, 1, 256)
    tokens, ref = eager_run(model, ids, DECODE_STEPS)
    got = [decoder.prefill(ids)]
    got.append(decoder.decode(tokens[:, 0]))
    with torch.compiler.set_stance("fail_on_recompile"):
        for j in range(1, DECODE_STEPS):
            got.append(decoder.decode(tokens[:, j]))
    got_t = torch.stack(got, 1)
    assert rel_diff(got_t, ref) <= TOL
    assert torch.equal(got_t[:, :-1].argmax(-1), tokens)
    assert decoder.compilations == {"prefill": 1, "decode": 1}


@pytest.mark.slow
def test_inductor_generate_on_the_demo_model_equals_eager() -> None:
    from qwen import AutoModelForCausalLM, AutoTokenizer
    from qwen.chat_template import make_context

    tok = AutoTokenizer.from_pretrained("qwen-demo")
    # Plain nn.Linear weights: the CPU default (oneDNN-packed, C gemv) calls code torch.compile cannot trace.
    model = AutoModelForCausalLM.from_pretrained("qwen-demo", progress=False, cpu_packed_weights=False).eval()
    _, context = make_context(tok, "What is 12 + 35?", history=[], system="You are a helpful assistant.")
    ids = torch.tensor([context])
    kw = dict(max_new_tokens=48, eos_token_id=[tok.im_end_id, tok.eod_id], stop_words_ids=[[tok.im_end_id]])
    eager = generate(model, ids, compile=False, **kw)
    fast = generate(model, ids, compile=True, **kw)
    assert torch.equal(eager, fast), (tok.decode(eager[0, len(context):]), tok.decode(fast[0, len(context):]))


# -------------------------------------------------------------------------------------------------- GPU tier
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not GPU, reason="needs a CUDA device")


@gpu
@needs_cuda
@pytest.mark.parametrize("setting,dtype", [(s, torch.bfloat16) for s in SETTINGS] + [("ntk+logn", torch.float32),
                                                                                    ("kv-int8-round", torch.float32)])
def test_cuda_graphs_equal_eager(setting: str, dtype: torch.dtype) -> None:
    """inductor + CUDA graphs ("reduce-overhead"), fp32 and bf16: prefill + 64 steps, one graph per kind."""
    model, prompt = model_for(setting)
    model = model.to("cuda", dtype)
    ids = torch.randint(0, 512, (1, prompt), generator=torch.Generator().manual_seed(1)).cuda()
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    decoder = compile_model(model, 1, 256)
    assert decoder.mode == "reduce-overhead"
    tokens, ref = eager_run(model, ids, DECODE_STEPS)
    got = forced_run(decoder, ids, tokens.cpu())
    # bf16: both paths round activations to bf16 at different points; logits agree to ~1e-2.
    tol = {torch.float32: TOL_OFFICIAL_INT8 if "official" in setting else 1e-4, torch.bfloat16: 3e-2}[dtype]
    assert rel_diff(got, ref.cpu()) <= tol
    agree = (got[:, :-1].argmax(-1) == tokens.cpu()).float().mean()
    assert agree == 1.0 if dtype == torch.float32 else agree >= 0.95
    assert decoder.compilations == {"prefill": 1, "decode": 1}
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == skips, "CUDA graphs were skipped"


@gpu
@needs_cuda
def test_cuda_generate_auto_uses_the_compiled_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(compiled.COMPILE_ENV, raising=False)
    model = make_model().cuda()
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(2)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    eager = generate(model, ids, attention_mask=mask, max_new_tokens=64, eos_token_id=[], compile=False)
    auto = generate(model, ids, attention_mask=mask, max_new_tokens=64, eos_token_id=[])
    assert compiled.decoders(model) and torch.equal(eager, auto)
    sampled = [generate(model, ids, attention_mask=mask, max_new_tokens=32, do_sample=True, seed=3, compile=c)
               for c in (False, True)]
    assert (sampled[0] == sampled[1]).float().mean() > 0.9  # same RNG stream; a near-tie may flip a draw


@gpu
@needs_cuda
def test_cuda_compiled_decode_is_faster_than_eager() -> None:
    """The 300M shape in bf16, batch 1: CUDA graphs remove the per-kernel launch cost of ~200 kernels/token."""
    torch.manual_seed(0)
    model = QWenLMHeadModel(preset_config("qwen-300m")).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (1, 128), device="cuda")
    rates = {}
    for flag in (False, True):
        generate(model, ids, max_new_tokens=16, eos_token_id=[], compile=flag)  # warm-up / compile
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, ids, max_new_tokens=256, eos_token_id=[], compile=flag)
        torch.cuda.synchronize()
        rates[flag] = 256 / (time.perf_counter() - t0)
    print(f"300M bf16 decode: eager {rates[False]:.0f} tok/s, compiled {rates[True]:.0f} tok/s")
    assert rates[True] > 1.5 * rates[False], rates


def test_logn_is_exactly_one_up_to_seq_length() -> None:
    """The compiled graphs apply LogN always: the factor is exactly 1 where the eager path applies none."""
    model = make_model()
    decoder = compile_model(model, 1, 256, compiled=False)
    positions = torch.arange(0, 200)[None]
    logn = decoder._logn(positions, torch.float32)
    assert logn is not None and torch.equal(logn[0, :64], torch.ones(64))
    assert logn[0, 64].item() == pytest.approx(math.log(65) / math.log(64), rel=1e-6)
