"""Our CPU decode kernels (qwen/kernels/gemv.cpp) against plain PyTorch matmuls."""

from __future__ import annotations

import pytest
import torch

from qwen import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.why_unavailable()}")


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n,k", [(64, 128), (37, 100), (5, 16), (130, 2051)])
def test_gemv_f32_equals_matmul(m: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g)
    ref = x.double() @ w.double().T
    # fp32 with a different summation order than MKL: error grows like sqrt(k) * eps * |terms|
    tol = 1e-5 * k ** 0.5 * 4
    torch.testing.assert_close(kernels.gemv_f32(x, w).double(), ref, atol=tol, rtol=1e-5)
    torch.testing.assert_close(kernels.gemv_f32(x, w, b).double(), ref + b.double(), atol=tol, rtol=1e-5)


def test_gemv_f32_keeps_leading_dims_and_rejects_bad_input() -> None:
    w = torch.randn(8, 32)
    x = torch.randn(1, 1, 32)
    assert kernels.gemv_f32(x, w).shape == (1, 1, 8)
    with pytest.raises(TypeError, match="fp32"):
        kernels.gemv_f32(x.double(), w)
    with pytest.raises(ValueError, match="32 input features"):
        kernels.gemv_f32(torch.randn(1, 31), w)


def _quantized(n: int, k: int, bits: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    scales = torch.rand(n, k // group, generator=g) * 0.02 + 0.001
    zeros = torch.randint(1, 2**bits, (n, k // group), generator=g).float()
    return codes, scales, zeros


@pytest.mark.parametrize("bits,group", [(8, 32), (8, 128), (8, 256), (8, 512), (4, 64), (4, 128), (4, 256), (4, 512)])
@pytest.mark.parametrize("m", [1, 2, 4, 5])
def test_quantized_rows_equal_the_dequantized_matmul(bits: int, group: int, m: int) -> None:
    n, k = 52, 1024
    codes, scales, zeros = _quantized(n, k, bits, group, seed=bits * 10 + m)
    bias = torch.randn(n)
    w = (codes.float() - zeros.repeat_interleave(group, 1)) * scales.repeat_interleave(group, 1)
    layer = kernels.QuantizedRows(codes, scales, zeros, bits, bias)
    x = torch.randn(m, k)
    y = layer(x).double()
    # The kernel rounds activations to int16 with one scale per row; against the matmul with those
    # rounded activations it is exact up to fp32 summation.
    sx = x.abs().amax(dim=1, keepdim=True) / 32767
    xq = torch.round(x / sx) * sx
    ref_q = xq.double() @ w.double().T + bias.double()
    torch.testing.assert_close(y, ref_q, atol=2e-4, rtol=1e-5)
    # Against the exact activations: the rounding costs ~1e-5 of the output's scale.
    ref = x.double() @ w.double().T + bias.double()
    assert float((y - ref).norm() / ref.norm()) < 1e-4
    assert layer.codes.numel() == n * k * bits // 8  # 4-bit: two codes per byte


def test_quantized_rows_reject_unsupported_groups() -> None:
    codes, scales, zeros = _quantized(8, 96, 4, 32, seed=0)
    with pytest.raises(ValueError, match="multiple of 64"):
        kernels.QuantizedRows(codes, scales, zeros, 4)
    with pytest.raises(ValueError, match="4- and 8-bit"):
        kernels.QuantizedRows(codes, scales, zeros, 3)


@pytest.mark.parametrize("bits,group,act_order", [(4, 128, False), (4, 64, True), (4, -1, False), (8, 32, False),
                                                   (8, 128, True), (8, -1, False)])
def test_quant_linear_decodes_through_the_gemv_kernel(bits: int, group: int, act_order: bool) -> None:
    from qwen.quant.linear import QuantLinear

    n, k = 64, 256
    g = k if group == -1 else group
    gen = torch.Generator().manual_seed(bits + g)
    q = torch.randint(0, 2**bits, (n, k), generator=gen)
    scales = (torch.rand(k // g, n, generator=gen) * 0.02 + 0.001).half()
    zeros = torch.randint(1, 2**bits, (k // g, n), generator=gen)
    g_idx = torch.arange(k) // g
    if act_order:  # a permuted g_idx, as GPTQ's desc_act writes
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    layer = QuantLinear.from_codes(q, scales, zeros, g_idx.int(), bits, group, bias=torch.randn(n, generator=gen).half())
    ref_layer = QuantLinear.from_codes(q, scales, zeros, g_idx.int(), bits, group, bias=layer.bias.clone())
    ref_layer.prepare(kernel="dequant")
    x = torch.randn(1, 3, k, generator=gen)
    with torch.no_grad():
        y = layer(x)  # 3 tokens: the decode kernel
        assert layer.decode_kernel == f"gemv-int{bits}"
        ref = ref_layer(x)
        assert ref_layer.decode_kernel is None  # a forced kernel is used as asked
        assert float((y - ref).norm() / ref.norm()) < 1e-4
        assert layer.kernel == "qwen-kernels"
        # Server-sized batches (9 rows) stay on the int16 kernel; prefill-sized ones (40 rows) run the
        # dequantized panels: bf16 rounding (2^-9 per element) on CPUs with native bf16, exact in fp32.
        x_batch = torch.randn(1, 9, k, generator=gen)
        assert float((layer(x_batch) - ref_layer(x_batch)).norm() / ref_layer(x_batch).norm()) < 1e-4
        x_long = torch.randn(1, max(40, kernels.panel_min_rows()), k, generator=gen)
        tol = 1e-2 if kernels.prefill_dtype() == torch.bfloat16 else 1e-5
        assert float((layer(x_long) - ref_layer(x_long)).norm() / ref_layer(x_long).norm()) < tol
    # Only our kernel's copy of the codes is held; qweight is rebuilt from it, bit for bit.
    assert layer.qweight.numel() == 0 and torch.equal(layer.state_dict()["qweight"], ref_layer.qweight)


@pytest.mark.parametrize("bits,group,n", [(8, 32, 64), (8, 128, 70), (4, 64, 64), (4, 128, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_panels_equal_the_dequantized_matmul(bits: int, group: int, n: int, dtype: torch.dtype,
                                                     monkeypatch) -> None:
    """dense() rebuilds the exact weight (bf16: rounded once); matmul() over panels, the whole layer at once
    or a few rows at a time (N % 4 != 0 included), equals x @ W^T in fp32 and within bf16 rounding in bf16."""
    k = 256
    codes, scales, zeros = _quantized(n, k, bits, group, seed=bits * n)
    bias = torch.randn(n)
    rows = kernels.QuantizedRows(codes, scales, zeros, bits, bias)
    s = scales.float().repeat_interleave(group, dim=1)
    # The kernel's form of s * (code - zero): s * code - (s * zero), one fp32 rounding apart from the other.
    w = s * codes.float() - (s * zeros.float().repeat_interleave(group, dim=1))
    torch.testing.assert_close(w, (codes.float() - zeros.float().repeat_interleave(group, dim=1)) * s,
                               rtol=0, atol=1e-6 * float(w.abs().max()))
    dense = rows.dense()
    torch.testing.assert_close(dense, w, rtol=0, atol=1e-6 * float(w.abs().max()))  # the compiler may fuse an FMA
    assert torch.equal(rows.dense(0, n, torch.bfloat16), dense.bfloat16())  # round to nearest even, as torch
    assert torch.equal(rows.dense(8, n), dense[8:])
    assert torch.equal(rows.code_matrix(), codes.to(torch.uint8))
    with pytest.raises(ValueError, match="multiple of 4"):
        rows.dense(2, 10)
    x = torch.randn(4, 37, k, generator=torch.Generator().manual_seed(1))
    ref = x.double() @ w.double().T + bias.double()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for panel in (kernels.PANEL_ELEMENTS, 8 * k):  # one GEMM; panels of 8 rows
        monkeypatch.setattr(kernels, "PANEL_ELEMENTS", panel)
        y = rows.matmul(x, dtype)
        assert y.shape == (4, 37, n) and y.dtype == torch.float32
        assert float((y - ref).norm() / ref.norm()) < tol, panel
    monkeypatch.setenv("QWEN_PREFILL_DTYPE", "fp32" if dtype == torch.float32 else "bf16")
    assert kernels.prefill_dtype() == dtype
    assert float((rows(x) - ref).norm() / ref.norm()) < tol  # 148 rows: __call__ takes the panels


def test_prefill_panels_ignore_outlier_channels() -> None:
    """Per-element (bf16) or no (fp32) activation rounding: three 100x input channels leave the relative
    error where it was, unlike a per-tensor 8-bit grid (fbgemm), whose error grows with the outliers."""
    n, k = 64, 256
    codes, scales, zeros = _quantized(n, k, 8, 128, seed=5)
    rows = kernels.QuantizedRows(codes, scales, zeros, 8)
    w = rows.dense().double()
    x = torch.randn(48, k, generator=torch.Generator().manual_seed(2))
    x[:, [3, 100, 200]] *= 100
    ref = x.double() @ w.T
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        assert float((rows.matmul(x, dtype) - ref).norm() / ref.norm()) < tol
    y_gemv = rows(x[:4])  # int16 per row: the outliers set the scale, the rest keeps ~300 levels
    assert float((y_gemv - ref[:4]).norm() / ref[:4].norm()) < 1e-3


def test_int8_lm_head_is_close_to_the_float_head_and_refuses_to_be_saved(tmp_path) -> None:
    from qwen import AutoModelForCausalLM
    from qwen.checkpoint import init_checkpoint
    from qwen.quant.head import Int8Head

    init_checkpoint("tiny-vocab", tmp_path / "m", seed=0)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", progress=False, int8_lm_head=True)
    assert isinstance(model.lm_head, Int8Head)
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full_ref = ref(ids).logits
        full = model(ids).logits  # 12 rows: the fp32 panel path
        last = model(ids, logits_to_keep=1).logits  # 1 row: the int8 decode kernel
    rel = float((full - full_ref).norm() / full_ref.norm())
    # Gaussian weights: step = max|w|/127 ~ 2.5 sigma/127 per group, error std = step/sqrt(12) ~ 0.6% of sigma
    assert rel < 1e-2
    torch.testing.assert_close(last[:, -1], full[:, -1], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(model.lm_head.weight, ref.lm_head.weight, atol=float(ref.lm_head.weight.abs().max()) / 127, rtol=0)
    with pytest.raises(RuntimeError, match="int8_lm_head"):
        model.save_pretrained(tmp_path / "out")
