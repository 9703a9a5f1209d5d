"""The one-call decode step (qwen/kernels/decode.py) against the module-by-module forward.

Both paths run the same quantized kernels; they differ in summation order and in where fp32 rounding
happens (RMSNorm, attention, SiLU), so logits agree to ~1e-5 relative, and greedy tokens are equal.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from qwen import kernels
from qwen.config import QWenConfig
from qwen.model import QWenLMHeadModel

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.why_unavailable()}")

LOGIT_TOL = 2e-4  # max |difference| / max |logit| over all decode steps


def _quantized_model(bits: int, group: int, act_order: bool = False, rotary_pct: float = 1.0,
                     seq_length: int = 16) -> QWenLMHeadModel:
    from qwen.bench.quant_kernels import _permute_groups
    from qwen.quant.gptq import quantize_model_rtn
    from qwen.quant.layout import GPTQConfig

    cfg = QWenConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                     num_attention_heads=4, kv_channels=32, seq_length=seq_length, rotary_pct=rotary_pct,
                     use_dynamic_ntk=True, use_logn_attn=True)
    model = QWenLMHeadModel(cfg)
    model.init_weights(seed=bits + group)
    model.eval().requires_grad_(False)
    quantize_model_rtn(model, GPTQConfig(bits=bits, group_size=group), progress=False)
    if act_order:  # act-order g_idx (a permutation of the inputs), as GPTQ's desc_act writes
        _permute_groups(model)
    return model


def _decode(model: QWenLMHeadModel, prompt: torch.Tensor, steps: int, fused: bool) -> tuple[torch.Tensor, list]:
    """Logits of `steps` greedy decode steps after the prompt, and the cache's K/V."""
    model.transformer.fused_decode = fused
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        logits = []
        for _ in range(steps):
            out = model(tok, past_key_values=cache)
            logits.append(out.logits[0, -1])
            tok = out.logits[:, -1:].argmax(-1)
    model.transformer.fused_decode = True
    return torch.stack(logits), [(k[:, :, : cache.length].clone(), v[:, :, : cache.length].clone())
                                 for k, v in zip(cache.keys, cache.values)]


@pytest.mark.parametrize("bits,group,act_order,rotary_pct,prompt_len", [
    (8, 64, False, 1.0, 10),   # LogN starts during decode (seq_length 16)
    (8, 32, True, 0.5, 20),    # act order; partial rotary; prompt beyond seq_length: NTK alpha > 1
    (4, 64, False, 1.0, 20),
    (4, 128, True, 1.0, 6),
])
def test_fused_decode_equals_the_module_path(bits: int, group: int, act_order: bool, rotary_pct: float,
                                             prompt_len: int) -> None:
    model = _quantized_model(bits, group, act_order, rotary_pct)
    prompt = torch.randint(0, 512, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    fused, fused_kv = _decode(model, prompt, 24, fused=True)
    assert model.transformer._fused is not None, "the fused step was not used"
    eager, eager_kv = _decode(model, prompt, 24, fused=False)
    scale = eager.abs().max()
    assert float((fused - eager).abs().max() / scale) < LOGIT_TOL
    assert torch.equal(fused.argmax(-1), eager.argmax(-1))
    for (kf, vf), (ke, ve) in zip(fused_kv, eager_kv):  # the cache holds the same post-RoPE keys and values
        torch.testing.assert_close(kf, ke, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(vf, ve, atol=1e-4, rtol=1e-4)


def test_generate_gives_the_same_tokens_with_and_without_the_fused_step(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _quantized_model(8, 64, seq_length=256)
    prompt = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    fused = model.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=[], stop_words_ids=[])
    assert model.transformer._fused is not None
    monkeypatch.setenv("QWEN_FUSED_DECODE", "0")
    model.transformer._fused = None
    eager = model.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=[], stop_words_ids=[])
    assert model.transformer._fused is None
    assert torch.equal(fused, eager)


def _one_step(model: QWenLMHeadModel, batch: int = 1, **cache_kwargs: object) -> None:
    prompt = torch.randint(0, 512, (batch, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values)


def test_forward_hooks_and_unsupported_inputs_take_the_module_path() -> None:
    model = _quantized_model(8, 64)
    calls = []
    handle = model.transformer.h[1].mlp.register_forward_hook(lambda *a: calls.append(1))
    _one_step(model)
    assert len(calls) == 2, "a hooked module must run (prefill and the decode step)"
    handle.remove()
    model.transformer._fused = None
    _one_step(model, batch=2)  # two sequences
    assert model.transformer._fused is None
    with torch.enable_grad():  # autograd wanted: the C call records nothing
        prompt = torch.randint(0, 512, (1, 4))
        out = model(prompt, use_cache=True)
        model(prompt[:, :1], past_key_values=out.past_key_values)
    assert model.transformer._fused is None
    _one_step(model)
    assert model.transformer._fused is not None


def test_a_re_prepared_layer_rebuilds_the_step_and_copies_do_not_share_pointers() -> None:
    model = _quantized_model(4, 64)
    _one_step(model)
    first = model.transformer._fused
    assert first is not None and first.still_valid()
    model.transformer.h[0].attn.c_attn.prepare(kernel="auto")  # new runtime: the old pointers are stale
    assert not first.still_valid()
    _one_step(model)
    assert model.transformer._fused is not first and model.transformer._fused.still_valid()
    clone = copy.deepcopy(model)
    assert clone.transformer._fused is None
    assert pickle.loads(pickle.dumps(model)).transformer._fused is None
    prompt = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(5))
    a, _ = _decode(model, prompt, 5, fused=True)
    b, _ = _decode(clone, prompt, 5, fused=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("packed", [False, True])
def test_fused_decode_of_an_fp32_model_equals_the_module_path(packed: bool) -> None:
    """Float blocks (plain nn.Linear, or PackedLinear holding the plain weight) take the fused step too."""
    from qwen.cpu_pack import pack_linear_layers

    cfg = QWenConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                     num_attention_heads=4, kv_channels=32, seq_length=16, use_logn_attn=True)
    model = QWenLMHeadModel(cfg)
    model.init_weights(seed=1)
    model.eval().requires_grad_(False)
    if packed:
        pack_linear_layers(model)
    prompt = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(2))
    fused, fused_kv = _decode(model, prompt, 16, fused=True)
    assert model.transformer._fused is not None
    eager, eager_kv = _decode(model, prompt, 16, fused=False)
    assert float((fused - eager).abs().max() / eager.abs().max()) < 1e-5
    assert torch.equal(fused.argmax(-1), eager.argmax(-1))
    for (kf, vf), (ke, ve) in zip(fused_kv, eager_kv):
        torch.testing.assert_close(kf, ke, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vf, ve, atol=1e-5, rtol=1e-5)
