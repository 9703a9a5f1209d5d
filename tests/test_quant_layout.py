"""The official GPTQ layout (spec §10): packing, shapes, and loading checkpoints written by hand.

The checkpoint writer in this file is independent of qwen/quant/layout.py: it packs with plain
Python loops over numpy uint32 words, straight from the spec's table, so a shared misreading of
the format cannot make both sides agree.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from torch import nn

from qwen import AutoModelForCausalLM
from qwen.checkpoint import CheckpointError
from qwen.config import preset_config
from qwen.model import QWenLMHeadModel
from qwen.quant.gptq import quantize_rtn
from qwen.quant.layout import (
    GPTQConfig,
    QuantConfigError,
    dequantize,
    pack_cols,
    pack_gptq_tensors,
    pack_rows,
    unpack_cols,
    unpack_rows,
)
from qwen.quant.linear import QuantLinear, _has_vnni, quant_linear_layers

SYM4_WORD = 0x77777777  # eight stored zeros of 7 (true zero 8)
SYM8_WORD = 0x7F7F7F7F  # four stored zeros of 127 (true zero 128)


def _signed(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


# ------------------------------------------------------------------------------------ pack / unpack
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_rows_matches_the_spec_bit_positions(bits: int) -> None:
    per = 32 // bits
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (4 * per, 6), generator=gen, dtype=torch.int32)
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (4, 6)
    for k in range(q.shape[0]):
        for n in range(q.shape[1]):
            word = int(packed[k // per, n]) & 0xFFFFFFFF
            assert (word >> (bits * (k % per))) & ((1 << bits) - 1) == int(q[k, n])
    assert torch.equal(unpack_rows(packed, bits), q)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_cols_round_trip_and_bit_positions(bits: int) -> None:
    per = 32 // bits
    gen = torch.Generator().manual_seed(10 + bits)
    z = torch.randint(0, 1 << bits, (5, 3 * per), generator=gen, dtype=torch.int32)
    packed = pack_cols(z, bits)
    assert packed.shape == (5, 3)
    for g in range(5):
        for n in range(3 * per):
            word = int(packed[g, n // per]) & 0xFFFFFFFF
            assert (word >> (bits * (n % per))) & ((1 << bits) - 1) == int(z[g, n])
    assert torch.equal(unpack_cols(packed, bits), z)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_layer_round_trip_for_group_sizes(bits: int, group_size: int) -> None:
    k, n = 256, 48
    g = k if group_size == -1 else group_size
    groups = k // g
    gen = torch.Generator().manual_seed(bits * 1000 + g)
    q = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, 1 << bits, (groups, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen) * 0.01 + 1e-3).half().float()
    g_idx = torch.arange(k, dtype=torch.int32) // g
    t = pack_gptq_tensors(q, scales, zeros, g_idx, bits)
    per = 32 // bits
    assert t["qweight"].shape == (k // per, n) and t["qzeros"].shape == (groups, n // per)
    assert t["scales"].shape == (groups, n) and t["scales"].dtype == torch.float16
    # The stored zero is zero - 1.
    assert torch.equal(unpack_cols(t["qzeros"], bits), zeros - 1)
    expected = (q.float() - zeros[g_idx.long()].t().float()) * scales[g_idx.long()].t()
    assert torch.equal(dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits), expected)


@pytest.mark.parametrize("bits,word", [(4, SYM4_WORD), (8, SYM8_WORD)])
def test_symmetric_zeros_are_stored_as_zero_minus_one(bits: int, word: int) -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    r = quantize_rtn(w, bits, 128, sym=True)
    assert bool((r.zeros == 1 << (bits - 1)).all())
    layer = QuantLinear.from_codes(r.q, r.scales, r.zeros, r.g_idx, bits, 128)
    assert bool((layer.qzeros == _signed(word)).all())


def test_bits_3_and_other_widths_are_rejected_clearly() -> None:
    with pytest.raises(QuantConfigError, match="bits=3 is not supported"):
        GPTQConfig(bits=3)
    with pytest.raises(QuantConfigError, match="bits must be one of"):
        GPTQConfig(bits=5)
    with pytest.raises(QuantConfigError, match="bits=3"):
        QuantLinear(64, 64, 3, 32)
    with pytest.raises(QuantConfigError, match="group_size"):
        GPTQConfig(group_size=0)
    with pytest.raises(QuantConfigError, match="multiples of 8"):
        QuantLinear(60, 64, 4, 32)
    with pytest.raises(QuantConfigError, match="zero - 1"):
        pack_gptq_tensors(torch.zeros(8, 8, dtype=torch.int32), torch.ones(1, 8), torch.zeros(1, 8, dtype=torch.int32),
                          torch.zeros(8, dtype=torch.int32), 4)


# ------------------------------------------------------------------------------------ official shapes
SPEC_SHAPES = {
    # (in, out): qweight, qzeros, scales at 4 bits, g = 128 (spec §10.3 tables)
    "7b.c_attn": ((4096, 12288), (512, 12288), (32, 1536), (32, 12288)),
    "7b.attn.c_proj": ((4096, 4096), (512, 4096), (32, 512), (32, 4096)),
    "7b.w1": ((4096, 11008), (512, 11008), (32, 1376), (32, 11008)),
    "7b.mlp.c_proj": ((11008, 4096), (1376, 4096), (86, 512), (86, 4096)),
    "14b.c_attn": ((5120, 15360), (640, 15360), (40, 1920), (40, 15360)),
    "14b.attn.c_proj": ((5120, 5120), (640, 5120), (40, 640), (40, 5120)),
    "14b.w1": ((5120, 13696), (640, 13696), (40, 1712), (40, 13696)),
    "14b.mlp.c_proj": ((13696, 5120), (1712, 5120), (107, 640), (107, 5120)),
}


@pytest.mark.parametrize("layer", sorted(SPEC_SHAPES))
def test_rtn_layers_of_7b_and_14b_shapes_match_the_spec(layer: str) -> None:
    (k, n), qweight, qzeros, scales = SPEC_SHAPES[layer]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.02
    r = quantize_rtn(w, 4, 128, sym=True)
    del w
    q = QuantLinear.from_codes(r.q, r.scales, r.zeros, r.g_idx, 4, 128)
    del r
    sd = q.state_dict()
    assert sorted(sd) == ["bias", "g_idx", "qweight", "qzeros", "scales"]
    assert tuple(sd["qweight"].shape) == qweight and sd["qweight"].dtype == torch.int32
    assert tuple(sd["qzeros"].shape) == qzeros and sd["qzeros"].dtype == torch.int32
    assert tuple(sd["scales"].shape) == scales and sd["scales"].dtype == torch.float16
    assert tuple(sd["g_idx"].shape) == (k,) and sd["g_idx"].dtype == torch.int32
    assert tuple(sd["bias"].shape) == (n,) and sd["bias"].dtype == torch.float16
    assert bool((sd["qzeros"] == _signed(SYM4_WORD)).all())
    assert torch.equal(sd["g_idx"], torch.arange(k, dtype=torch.int32) // 128)


# ------------------------------------------------------------------------------------ independent writer
QUANTIZED = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


def _hand_pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """q [K, N] -> int32 [K/per, N]: row k goes to word k // per at bit bits * (k % per)."""
    per = 32 // bits
    k_total, n_total = q.shape
    words = np.zeros((k_total // per, n_total), dtype=np.uint32)
    for k in range(k_total):  # one input row at a time, all outputs at once
        words[k // per] |= q[k].astype(np.uint32) << np.uint32(bits * (k % per))
    return words.view(np.int32)


def _hand_pack_cols(z: np.ndarray, bits: int) -> np.ndarray:
    """z [G, N] -> int32 [G, N/per]: column n goes to word n // per at bit bits * (n % per)."""
    per = 32 // bits
    g_total, n_total = z.shape
    words = np.zeros((g_total, n_total // per), dtype=np.uint32)
    for n in range(n_total):  # one output column at a time, all groups at once
        words[:, n // per] |= z[:, n].astype(np.uint32) << np.uint32(bits * (n % per))
    return words.view(np.int32)


def _write_hand_checkpoint(path: str, bits: int, group_size: int, desc_act: bool, sym: bool, seed: int,
                           ragged_g_idx: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A tiny Qwen checkpoint in the official GPTQ layout, written from known integer codes.

    Returns (float weights the model should compute with, as float64 [N, K] / [N]) and the raw tensors.
    """
    config = preset_config("tiny-vocab")
    rng = np.random.default_rng(seed)
    maxq = (1 << bits) - 1
    tensors: dict[str, np.ndarray] = {}
    dense: dict[str, np.ndarray] = {}
    h = config.hidden_size
    tensors["transformer.wte.weight"] = (rng.standard_normal((config.vocab_size, h)) * 0.5).astype(np.float16)
    tensors["lm_head.weight"] = (rng.standard_normal((config.vocab_size, h)) * 0.1).astype(np.float16)
    tensors["transformer.ln_f.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float16)
    ref = QWenLMHeadModel(config)
    for i in range(config.num_hidden_layers):
        for norm in ("ln_1", "ln_2"):
            tensors[f"transformer.h.{i}.{norm}.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float16)
        for sub in QUANTIZED:
            linear = ref.get_submodule(f"transformer.h.{i}.{sub}")
            k, n = linear.in_features, linear.out_features
            g = k if group_size == -1 else group_size
            groups = -(-k // g)
            q = rng.integers(0, maxq + 1, size=(k, n))
            zeros = np.full((groups, n), 1 << (bits - 1)) if sym else rng.integers(1, maxq + 1, size=(groups, n))
            scales = (rng.random((groups, n)) * 0.02 / (1 << (bits - 4) if bits > 4 else 1) + 0.002).astype(np.float16)
            if ragged_g_idx:
                g_idx = np.arange(k) // g
                g_idx[g] = 0  # group 0 gets g + 1 inputs, group 1 g - 1: no fast kernel takes this
                g_idx = g_idx[rng.permutation(k)]
            elif desc_act:
                perm = rng.permutation(k)  # the order act-order would have quantized the inputs in
                g_idx = np.empty(k, dtype=np.int64)
                g_idx[perm] = np.arange(k) // g
            else:
                g_idx = np.arange(k) // g
            has_bias = sub == "attn.c_attn"
            bias = (rng.standard_normal(n) * 0.1 if has_bias else np.zeros(n)).astype(np.float16)
            name = f"transformer.h.{i}.{sub}"
            tensors[f"{name}.qweight"] = _hand_pack_rows(q, bits)
            tensors[f"{name}.qzeros"] = _hand_pack_cols(zeros - 1, bits)
            tensors[f"{name}.scales"] = scales
            tensors[f"{name}.g_idx"] = g_idx.astype(np.int32)
            tensors[f"{name}.bias"] = bias
            w = np.empty((n, k))
            for kk in range(k):
                grp = g_idx[kk]
                w[:, kk] = scales[grp].astype(np.float64) * (q[kk] - zeros[grp])
            dense[f"{name}.weight"] = w
            dense[f"{name}.bias"] = bias.astype(np.float64)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    quant = {"bits": bits, "group_size": group_size, "damp_percent": 0.01, "desc_act": desc_act,
             "static_groups": False, "sym": sym, "true_sequential": True, "model_name_or_path": None,
             "model_file_base_name": "model"}
    cfg = config.to_dict()
    cfg.update(torch_dtype="float16", fp16=True, quantization_config={**quant, "quant_method": "gptq"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(path, "quantize_config.json"), "w") as f:
        json.dump(quant, f)
    return dense, tensors


def _float_reference(path: str, dense: dict[str, np.ndarray], tensors: dict[str, np.ndarray]) -> QWenLMHeadModel:
    model = QWenLMHeadModel(preset_config("tiny-vocab"))
    state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in tensors.items() if k.endswith(".weight")}
    state.update({k: torch.from_numpy(v).float() for k, v in dense.items()})
    model.load_state_dict(state, strict=False)  # c_proj/w1/w2 have no bias parameter in the float model
    for name, v in dense.items():
        if name.endswith(".bias") and not name.endswith("c_attn.bias"):
            assert not v.any()
    return model.eval()


CASES = {
    "int4-g32": dict(bits=4, group_size=32, desc_act=False, sym=True),
    "int4-g32-desc_act": dict(bits=4, group_size=32, desc_act=True, sym=False),
    "int4-per-row": dict(bits=4, group_size=-1, desc_act=False, sym=False),
    "int4-ragged-g_idx": dict(bits=4, group_size=32, desc_act=True, sym=True, ragged_g_idx=True),
    "int8-g32-desc_act": dict(bits=8, group_size=32, desc_act=True, sym=True),
    "int8-per-row": dict(bits=8, group_size=-1, desc_act=False, sym=False),
    "int2-g32": dict(bits=2, group_size=32, desc_act=False, sym=False),
}
EXPECTED_KERNEL = {"int4-g32": "int4-tinygemm", "int4-g32-desc_act": "int4-tinygemm", "int4-per-row": "qwen-kernels",
                   "int4-ragged-g_idx": "dequant", "int8-g32-desc_act": "qwen-kernels", "int8-per-row": "qwen-kernels",
                   "int2-g32": "dequant"}
# Relative error of the fast kernels against the exact float64 product: tinygemm runs in bf16 (~2^-9
# per rounding); our kernels round activations to int16 per row for these few-row inputs (~1e-5).
KERNEL_TOLERANCE = {"int4-tinygemm": 1e-2, "qwen-kernels": 1e-4, "dequant": 1e-5}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hand_written_checkpoint_loads_and_computes_the_dequantized_layer(tmp_path, case: str) -> None:
    spec = CASES[case]
    path = str(tmp_path / case)
    dense, tensors = _write_hand_checkpoint(path, seed=7, **spec)
    model = AutoModelForCausalLM.from_pretrained(path, progress=False)
    layers = dict(quant_linear_layers(model))
    assert sorted(layers) == sorted(f"transformer.h.{i}.{s}" for i in range(2) for s in QUANTIZED)
    # The loaded buffers are the file's tensors, bit for bit (state_dict keys = the official names).
    sd = model.state_dict()
    for name, value in tensors.items():
        assert np.array_equal(sd[name].numpy(), value.astype(sd[name].numpy().dtype)), name
    gen = torch.Generator().manual_seed(3)
    tol = KERNEL_TOLERANCE[EXPECTED_KERNEL[case]]
    for name, layer in layers.items():
        assert layer.kernel == EXPECTED_KERNEL[case], (name, layer.kernel)
        x = torch.randn(3, 5, layer.in_features, generator=gen)
        expected = torch.from_numpy(x.double().numpy() @ dense[f"{name}.weight"].T + dense[f"{name}.bias"])
        scale = float(expected.abs().max())
        with torch.no_grad():
            got = layer(x).double()
            assert float((got - expected).abs().max()) <= tol * scale, name
            layer.prepare(kernel="dequant")
            assert float((layer(x).double() - expected).abs().max()) <= 1e-5 * scale, name
            layer.prepare(kernel="auto")

    # Whole model: logits equal those of a float model holding the dequantized weights.
    reference = _float_reference(path, dense, tensors)
    ids = torch.randint(0, 512, (2, 9), generator=gen)
    with torch.no_grad():
        expected_logits = reference(ids).logits
        # The fast kernels' rounding compounds over this random model (measured: 0.3-0.6% of the largest
        # logit with tinygemm; fbgemm's per-tensor 8-bit activations, no longer chosen, gave 5-7%, 27% with
        # its 7-bit ones on CPUs without VNNI); the exact check follows.
        fast = model(ids).logits
        bound = {"int4-tinygemm": 2e-2, "qwen-kernels": 1e-3, "dequant": 1e-4}[EXPECTED_KERNEL[case]]
        assert float((fast - expected_logits).abs().max()) <= bound * float(expected_logits.abs().max())
        for layer in layers.values():
            layer.prepare(kernel="dequant")
        assert torch.allclose(model(ids).logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_quantized_checkpoint_rejects_bad_tensors_with_file_and_name(tmp_path) -> None:
    path = str(tmp_path / "ok")
    _dense, tensors = _write_hand_checkpoint(path, bits=4, group_size=32, desc_act=False, sym=True, seed=1)
    weights = os.path.join(path, "model.safetensors")
    bad = dict(tensors)
    bad["transformer.h.1.mlp.w1.qweight"] = np.zeros((4, 128), np.int32)  # should be [8, 128]
    save_file(bad, weights)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'transformer\.h\.1\.mlp\.w1\.qweight' has "
                       r"shape \[4, 128\], the config implies \[8, 128\]"):
        AutoModelForCausalLM.from_pretrained(path, progress=False)
    bad = dict(tensors)
    bad["transformer.h.0.attn.c_proj.qzeros"] = bad["transformer.h.0.attn.c_proj.qzeros"].astype(np.float32)
    save_file(bad, weights)
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.0\.attn\.c_proj\.qzeros' has dtype torch\.float32, "
                       r"expected torch\.int32"):
        AutoModelForCausalLM.from_pretrained(path, progress=False)
    bad = dict(tensors)
    bad["transformer.h.0.mlp.c_proj.g_idx"] = np.full(128, 9, np.int32)  # 4 groups only
    save_file(bad, weights)
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.mlp\.c_proj: g_idx holds group 9"):
        AutoModelForCausalLM.from_pretrained(path, progress=False)
    # A config whose group size disagrees with the tensors: scales/qzeros have the wrong row count.
    save_file(tensors, weights)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["quantization_config"]["group_size"] = 64
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="group_size=64 but quantize_config.json has group_size=32"):
        AutoModelForCausalLM.from_pretrained(path, progress=False)
    os.remove(os.path.join(path, "quantize_config.json"))
    with pytest.raises(CheckpointError, match=r"tensor 'transformer\.h\.0\.attn\.c_attn\.qzeros' has shape \[2, 24\], "
                       r"the config implies \[1, 24\]"):
        AutoModelForCausalLM.from_pretrained(path, progress=False)
    cfg["quantization_config"].update(group_size=32, bits=3)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"config\.json quantization_config: bits=3 is not supported"):
        AutoModelForCausalLM.from_pretrained(path, progress=False)
    cfg["quantization_config"].update(bits=4, quant_method="awq")
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="quant_method is 'awq'"):
        AutoModelForCausalLM.from_pretrained(path, progress=False)


def test_dtype_changes_keep_the_official_buffer_dtypes() -> None:
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    r = quantize_rtn(w, 4, 32)
    layer = QuantLinear.from_codes(r.q, r.scales, r.zeros, r.g_idx, 4, 32)
    wrapper = nn.Sequential(layer).to(torch.float32).double()
    dtypes = {k: v.dtype for k, v in wrapper.state_dict().items()}
    assert dtypes == {"0.qweight": torch.int32, "0.qzeros": torch.int32, "0.scales": torch.float16,
                      "0.g_idx": torch.int32, "0.bias": torch.float16}


# ------------------------------------------------------------------------------------ kernel choice
KERNEL_CASES = [
    # bits, group_size, K, N, act-order g_idx, expected kernel
    (4, 128, 256, 64, False, "qwen-kernels"),
    (4, 128, 256, 64, True, "qwen-kernels"),
    (4, -1, 256, 48, False, "qwen-kernels"),
    (4, 32, 256, 64, False, "int4-tinygemm"),  # our int4 kernels take groups of whole 64-input chunks
    (4, 32, 256, 64, True, "int4-tinygemm"),
    (4, -1, 344, 64, False, "dequant"),  # groups must be whole multiples of 32 inputs
    (4, 32, 256, 40, False, "dequant"),  # tinygemm needs N % 16 == 0
    (4, 48, 240, 64, False, "dequant"),
    (8, -1, 256, 64, False, "qwen-kernels"),
    (8, 128, 256, 64, True, "qwen-kernels"),
    (8, -1, 344, 64, False, "dequant"),  # int8 without our kernels: exact, never per-tensor 8-bit activations
    (8, 96, 240, 64, False, "dequant"),  # a shorter last group
    (2, 64, 256, 64, False, "dequant"),
]


@pytest.mark.parametrize("bits,group_size,k,n,act_order,kernel", KERNEL_CASES)
def test_kernel_choice_and_agreement_with_the_reference(bits, group_size, k, n, act_order, kernel) -> None:
    gen = torch.Generator().manual_seed(k + n + bits)
    g = k if group_size == -1 else group_size
    groups = -(-k // g)
    q = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, 1 << bits, (groups, n), generator=gen, dtype=torch.int32)
    scales = torch.rand(groups, n, generator=gen) * 0.02 + 0.001
    g_idx = torch.arange(k, dtype=torch.int32) // g
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    layer = QuantLinear.from_codes(q, scales, zeros, g_idx, bits, group_size,
                                   bias=torch.randn(n, generator=gen))
    x = torch.randn(2, 3, k, generator=gen)
    with torch.no_grad():
        layer.prepare(kernel="dequant")
        reference = layer(x)
        assert torch.allclose(reference, x @ layer.dequantized_weight().t() + layer.bias.float(), atol=1e-5, rtol=1e-5)
        layer.prepare(kernel="auto")
        got = layer(x)
    assert layer.kernel == kernel
    tol = {"int4-tinygemm": 1e-2, "qwen-kernels": 1e-4, "dequant": 1e-6}[kernel]
    assert float((got - reference).abs().max()) <= tol * float(reference.abs().max())
    if kernel == "dequant":
        with pytest.raises(ValueError, match="cannot run this layer"):
            layer.prepare(kernel="qwen-kernels")
    with torch.no_grad():  # bfloat16 models: tinygemm for int4 where it applies, else the exact path
        assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert layer.kernel == ("int4-tinygemm" if kernel != "dequant" and bits == 4 and n % 16 == 0
                            and g % 32 == 0 and k % g == 0 else "dequant")


def test_int8_rowwise_is_opt_in_and_keeps_the_official_codes() -> None:
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(64, 256, generator=gen) * 0.05
    r = quantize_rtn(w, 8, 64)
    layer = QuantLinear.from_codes(r.q, r.scales, r.zeros, r.g_idx, 8, 64)
    codes = layer.qweight.clone()
    x = torch.randn(5, 256, generator=gen)
    with torch.no_grad():
        assert layer.prepare(kernel="dequant") == "dequant"
        reference = layer(x)
        assert layer.prepare(kernel="auto") == "qwen-kernels"  # auto never re-rounds the weights
        assert layer.prepare(kernel="int8-rowwise") == "int8-rowwise"
        got = layer(x)
    assert float((got - reference).abs().max()) <= (2e-2 if _has_vnni() else 4e-2) * float(reference.abs().max())
    assert torch.equal(layer.state_dict()["qweight"], codes)  # saving writes the checkpoint's codes
