"""The Triton GPTQ kernels (qwen/quant/triton_gptq.py) and QuantLinear's "triton" kernel.

Without a GPU these run in Triton's interpreter (TRITON_INTERPRET=1, set below before anything
imports triton's kernels), which executes each program's block operations in numpy: the kernels'
indexing, masking, unpacking, group lookups, act-order permutation and split-K are all exercised,
not their GPU code generation or speed. Shapes stay small for that reason.

Weights come from our own GPTQ/RTN quantizer in the official layout (int4 and int8, sym and asym,
groups 32/128/-1, act-order on and off). The reference is ``x @ W^T + b`` with W from
layout.dequantize in fp32. Tolerances, relative to the largest reference output:

* fp32 inputs: 1e-5 (the kernels multiply exactly in fp32, only the summation order differs;
  observed ~5e-7);
* fp16 / bf16 inputs: the reference multiplies the weight rounded to that dtype (as the kernels do)
  in fp32; the kernel's output is then rounded once to fp16 (2^-11) or bf16 (2^-8): 2e-3 and 1e-2.

Tests marked ``gpu`` run on CUDA only (bigger shapes, a speed print, CUDA graphs, tinygemm).
"""

from __future__ import annotations

import os

import copy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Before triton's kernels are first imported (they are decorated in interpreter mode or not then).
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from qwen.quant.gptq import quantize_gptq, quantize_rtn  # noqa: E402
from qwen.quant.layout import dequantize  # noqa: E402
from qwen.quant.linear import QuantLinear  # noqa: E402
from qwen.quant import triton_gptq as tg  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
INTERPRETED = tg.interpreting()
on_cpu = pytest.mark.skipif(not INTERPRETED, reason="triton kernels are compiled in this process (not interpreted)")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _hessian(k: int, seed: int, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Unequal input scales, so act-order really permutes the inputs.
    x = (torch.randn(4 * k, k, generator=gen) * (torch.rand(k, generator=gen) * 3 + 0.1)).to(device)
    return 2 * x.t() @ x / x.shape[0]


def _layer(bits: int, group: int, sym: bool, act_order: bool, k: int = 256, n: int = 64, seed: int = 0,
           device: str = "cpu") -> QuantLinear:
    """A QuantLinear with real GPTQ codes (desc_act = act_order) and a random bias."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).to(device)
    r = quantize_gptq(w, _hessian(k, seed, device), bits, group, sym=sym, desc_act=act_order)
    bias = torch.randn(n, generator=gen)
    layer = QuantLinear.from_codes(r.q.cpu(), r.scales.cpu(), r.zeros.cpu(), r.g_idx.cpu(), bits, group, bias=bias)
    return layer.to(device)


def _weight(layer: QuantLinear) -> tg.TritonGPTQWeight:
    return tg.TritonGPTQWeight.from_official(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits,
                                             layer.group_size, layer.bias)


def _dense(layer: QuantLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] in fp32, rounded to ``dtype`` first (what the kernels multiply)."""
    w = dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, torch.float32)
    return w.to(dtype).float()


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


# ------------------------------------------------------------------------------------ kernels vs dense
# Every pair of (bits, group, sym, act-order) levels in the fast tier; the rest of the grid is slow.
FAST = [(4, 32, True, False), (8, 32, False, True), (4, 128, False, True), (8, 128, True, False),
        (4, -1, True, True), (8, -1, False, False)]
CASES = [pytest.param(*c, marks=() if c in FAST else pytest.mark.slow)
         for c in [(bits, group, sym, act) for bits in (4, 8) for group in (32, 128, -1) for sym in (True, False)
                   for act in (False, True)]]


@on_cpu
@pytest.mark.parametrize("bits, group, sym, act_order", CASES)
def test_forward_and_input_gradient_equal_the_dense_product(bits, group, sym, act_order):
    layer = _layer(bits, group, sym, act_order, seed=bits * 100 + (group % 97) + 3 * sym + act_order)
    w = _weight(layer)
    if act_order and group != -1:
        assert w.perm is not None  # GPTQ's desc_act did permute the inputs
    dense, bias = _dense(layer), layer.bias.float()
    gen = torch.Generator().manual_seed(1)
    for m in (1, 3, 17, 64):
        x = torch.randn(m, layer.in_features, generator=gen)
        y = w.matmul(x)
        assert y.shape == (m, layer.out_features) and y.dtype == torch.float32
        assert _rel(y, x @ dense.t() + bias) < TOL[torch.float32], m
        gy = torch.randn(m, layer.out_features, generator=gen)
        assert _rel(w.grad_input(gy), gy @ dense) < TOL[torch.float32], m


@on_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits, group, act_order", [(4, 128, True), (8, 32, False)])
def test_half_precision_inputs(dtype, bits, group, act_order):
    layer = _layer(bits, group, False, act_order, seed=7)
    w = _weight(layer)
    dense, bias = _dense(layer, dtype), layer.bias.float()
    gen = torch.Generator().manual_seed(2)
    for m in (1, 17):
        x = torch.randn(m, layer.in_features, generator=gen).to(dtype)
        y = w.matmul(x)
        assert y.dtype == dtype
        assert _rel(y, x.float() @ dense.t() + bias) < TOL[dtype], m
        gy = torch.randn(m, layer.out_features, generator=gen).to(dtype)
        gx = w.grad_input(gy)
        assert gx.dtype == dtype and _rel(gx, gy.float() @ dense) < TOL[dtype], m


@on_cpu
@pytest.mark.parametrize("variant, m, split_k", [
    ("gemv", 1, 1), ("gemv", 2, 3), ("gemv", 5, 2), ("gemv", 8, 7), ("mm", 1, 1), ("mm", 9, 2), ("mm", 33, 5),
    ("auto", 4, 0), ("auto", 40, 0),
])
def test_every_kernel_and_split_gives_the_same_product(variant, m, split_k):
    layer = _layer(4, 32, False, True, seed=11)
    w = _weight(layer)
    x = torch.randn(m, layer.in_features, generator=torch.Generator().manual_seed(3))
    y = w.matmul(x, variant=variant, split_k=split_k)
    assert _rel(y, x @ _dense(layer).t() + layer.bias.float()) < TOL[torch.float32]


@on_cpu
@pytest.mark.parametrize("bits, group, k, n, shuffle", [
    (4, 128, 344, 40, False),  # a shorter last group (K = 344), N not a multiple of the column block
    (4, -1, 344, 64, False),  # one group of 344 inputs: any K-tile stays inside it
    (4, 8, 256, 64, False),  # groups smaller than tl.dot's 16: every row looks its group up
    (8, 48, 192, 32, False),  # groups of 48: K-tiles of 16
    (4, 32, 256, 64, True),  # g_idx an arbitrary assignment (not whole groups after sorting)
    (2, 32, 256, 64, True),  # 2-bit codes, 16 per word
])
def test_odd_groupings(bits, group, k, n, shuffle):
    gen = torch.Generator().manual_seed(k + n + bits)
    r = quantize_rtn(torch.randn(n, k, generator=gen), bits, group, sym=False)
    g_idx = r.g_idx[torch.randperm(k, generator=gen)] if shuffle else r.g_idx
    layer = QuantLinear.from_codes(r.q, r.scales, r.zeros, g_idx, bits, group, bias=torch.randn(n, generator=gen))
    w = _weight(layer)
    dense = _dense(layer)
    for m in (2, 20):
        x = torch.randn(m, k, generator=gen)
        assert _rel(w.matmul(x), x @ dense.t() + layer.bias.float()) < TOL[torch.float32]
        gy = torch.randn(m, n, generator=gen)
        assert _rel(w.grad_input(gy), gy @ dense) < TOL[torch.float32]


@on_cpu
def test_act_order_copy_gives_back_the_official_codes():
    layer = _layer(4, 32, True, True, seed=5)
    w = _weight(layer)
    assert w.perm is not None and not torch.equal(w.qweight, layer.qweight)
    assert torch.equal(w.official_qweight(), layer.qweight)
    # No permutation: the kernels read the official buffer itself.
    plain = _weight(_layer(4, 32, True, False, seed=5))
    assert plain.perm is None


@on_cpu
def test_probe_runs_the_kernels():
    assert tg.probe(torch.device("cpu")) is None


def test_launch_configurations():
    cpu = torch.device("cpu")
    cfg = tg.forward_config(1, 4096, 4096, 128, True, torch.float16, cpu)
    assert cfg.kernel == "gemv" and cfg.block_m == 1 and cfg.tile_group
    assert tg.forward_config(9, 4096, 4096, 128, True, torch.float16, cpu).kernel == "mm"
    # The K-tile shrinks to fit the group; below 16 inputs every row looks its group up.
    assert tg.forward_config(64, 512, 512, 32, True, torch.float16, cpu).block_k == 32
    assert tg.forward_config(64, 512, 480, 48, True, torch.float16, cpu).block_k == 16
    assert not tg.forward_config(64, 512, 512, 8, True, torch.float16, cpu).tile_group
    assert tg.forward_config(64, 512, 344, 344, True, torch.float16, cpu).tile_group  # one group
    assert not tg.forward_config(64, 512, 512, 32, False, torch.float16, cpu).tile_group  # not k // g
    # Splits never come out empty, and cover every K-tile.
    for k, split in ((512, 3), (4096, 7), (256, 100)):
        c = tg.forward_config(1, 256, k, 32, True, torch.float32, cpu, split_k=split)
        tiles = -(-k // c.block_k)
        assert (c.split_k - 1) * c.tiles_per_split < tiles <= c.split_k * c.tiles_per_split
    with pytest.raises(ValueError, match="at most 8 rows"):
        tg.forward_config(9, 256, 256, 32, True, torch.float32, cpu, variant=1)


# ------------------------------------------------------------------------------------ QuantLinear
@on_cpu
@pytest.mark.parametrize("bits, act_order", [(4, True), (8, False)])
def test_quant_linear_triton_kernel_equals_the_reference_path(bits, act_order):
    layer = _layer(bits, 32, False, act_order, seed=21)
    ref = copy.deepcopy(layer)
    ref.prepare(kernel="dequant")
    official = {k: v.clone() for k, v in layer.state_dict().items()}
    assert layer.prepare(kernel="triton") == "triton" and layer.kernel == "triton"
    # The act-order copy replaces the official qweight in memory; state_dict rebuilds it.
    assert layer._codes_released == (act_order and True)
    assert all(torch.equal(v, official[k]) for k, v in layer.state_dict().items())

    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), ref(x_ref)
    assert y.shape == (2, 5, layer.out_features)
    assert _rel(y, y_ref.detach()) < TOL[torch.float32]
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    assert _rel(x.grad, x_ref.grad) < TOL[torch.float32]
    assert not any(b.requires_grad for b in layer.buffers())
    with torch.no_grad():
        assert _rel(layer(x), y_ref.detach()) < TOL[torch.float32]
    # model.to(...) rebuilds the kernel on the next call and keeps the official codes.
    layer.to(torch.float32)
    assert layer.kernel is None and torch.equal(layer.qweight, official["qweight"])
    assert _rel(layer(x.detach()), y_ref.detach()) < TOL[torch.float32] and layer.kernel == "triton"


@on_cpu
@pytest.mark.parametrize("bits, group, dtype", [(8, 32, torch.bfloat16), (4, 32, torch.bfloat16),
                                                (4, 128, torch.float32), (2, 32, torch.float32)])
def test_auto_never_picks_the_interpreter(bits, group, dtype):
    """On the CPU "auto" chooses among the CPU kernels as before, even with TRITON_INTERPRET=1."""
    gen = torch.Generator().manual_seed(bits)
    r = quantize_rtn(torch.randn(64, 256, generator=gen), bits, group)
    layer = QuantLinear.from_codes(r.q, r.scales, r.zeros, r.g_idx, bits, group)
    assert layer.prepare(torch.device("cpu"), dtype) in ("qwen-kernels", "int4-tinygemm", "dequant")


@on_cpu
def test_qlora_gradients_through_the_triton_kernel(tmp_path):
    pytest.importorskip("peft")
    from qwen.checkpoint import init_checkpoint, load_model
    from qwen.finetune.lora import LoraSettings, apply_lora
    from qwen.quant import GPTQConfig, quantize_model
    from qwen.quant.linear import quant_linear_layers

    init_checkpoint("tiny-vocab", tmp_path / "fp", seed=1, dtype=torch.float32, chat=True)
    model = load_model(tmp_path / "fp", cpu_packed_weights=False, progress=False)
    quantize_model(model, GPTQConfig(bits=4, group_size=32), "rtn", progress=False)
    model.save_pretrained(str(tmp_path / "int4"))
    ids = torch.tensor([[5, 17, 300, 42, 8, 99, 150, 7], [11, 3, 250, 480, 2, 19, 77, 130]])

    grads = {}
    for kernel in ("triton", "dequant"):
        base = load_model(tmp_path / "int4", quant_kernel=kernel, cpu_packed_weights=False, progress=False)
        assert {layer.kernel for _, layer in quant_linear_layers(base)} == {kernel}
        torch.manual_seed(0)
        pm = apply_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0), verbose=False)
        for name, p in pm.named_parameters():  # B starts at zero: give it values so dA is not zero
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
        pm.train()
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        grads[kernel] = (loss.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    loss_t, g_t = grads["triton"]
    loss_d, g_d = grads["dequant"]
    assert abs(float(loss_t - loss_d)) < 1e-5 * abs(float(loss_d))
    assert g_t.keys() == g_d.keys() and any("lora_A" in n for n in g_t)
    for name in g_t:
        assert _rel(g_t[name], g_d[name]) < 1e-4, name


@on_cpu
def test_torch_compile_treats_the_op_as_one_node():
    """inductor (CPU) compiles around the opaque interpreter op, forward and backward, no graph break."""
    layer = _layer(4, 32, False, True, seed=9)
    layer.prepare(kernel="triton")
    ref = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 4, layer.in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = compiled(x), ref(x_ref)
    assert _rel(y, y_ref.detach()) < TOL[torch.float32]
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    assert _rel(x.grad, x_ref.grad) < TOL[torch.float32]


def _run_python(code: str, env: dict[str, str | None]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in env}
    full.update({k: v for k, v in env.items() if v is not None})
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=300)


def test_missing_triton_names_the_pip_pin():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from qwen.quant.linear import QuantLinear\n"
        "from qwen.quant import triton_gptq as tg\n"
        "layer = QuantLinear(64, 64, 4, 32)\n"
        "assert layer.prepare(torch.device('cpu')) != 'triton'\n"
        "try:\n"
        "    layer.prepare(kernel='triton')\n"
        "except ValueError as e:\n"
        "    print('ERR', e)\n"
        "try:\n"
        "    tg.TritonGPTQWeight.from_official(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, 32)\n"
        "except ImportError as e:\n"
        "    print('IMPORT', e)\n"
    )
    out = _run_python(code, {"TRITON_INTERPRET": None})
    assert out.returncode == 0, out.stderr
    assert f"pip install triton=={tg.TRITON_PIN}" in out.stdout.split("IMPORT")[0]
    assert f"pip install triton=={tg.TRITON_PIN}" in out.stdout.split("IMPORT")[1]


@pytest.mark.slow
def test_compiled_triton_op_decomposes_into_the_kernel_launch():
    """Without the interpreter the operators are torch.library.triton_ops: AOTAutograd (what torch.compile
    runs before inductor) sees the kernel launch itself. No GPU is needed to trace, only to run."""
    code = (
        "import torch\n"
        "from torch._functorch.aot_autograd import aot_function\n"
        "from qwen.quant.gptq import quantize_rtn\n"
        "from qwen.quant.layout import pack_gptq_tensors\n"
        "from qwen.quant import triton_gptq as tg\n"
        "assert not tg.interpreting() and tg.ops_traceable()\n"
        "r = quantize_rtn(torch.randn(64, 256), 4, 32, sym=False)\n"
        "t = pack_gptq_tensors(r.q, r.scales, r.zeros, r.g_idx[torch.randperm(256)], 4, None)\n"
        "w = tg.TritonGPTQWeight.from_official(t['qweight'], t['qzeros'], t['scales'], t['g_idx'], 4, 32, t['bias'])\n"
        "graphs = []\n"
        "def f(x, qw, qz, sc, gi, perm, bias):\n"
        "    return torch.ops.qwen.gptq_matmul(x, qw, qz, sc, gi, perm, bias, 4, 32, w.natural, 0, 0)\n"
        "for m in (2, 40):\n"
        "    g = aot_function(f, fw_compiler=lambda gm, _: (graphs.append(gm.code), lambda *a: None)[1])\n"
        "    try:\n"
        "        g(torch.randn(m, 256, dtype=torch.float16), w.qweight, w.qzeros, w.scales, w.g_idx, w.perm, w.bias)\n"
        "    except Exception:\n"
        "        pass  # the stand-in compiled function returns nothing: only the graph matters\n"
        "print('\\n'.join(graphs))\n"
    )
    out = _run_python(code, {"TRITON_INTERPRET": None})
    assert out.returncode == 0, out.stderr
    graphs = out.stdout.split("def forward")[1:]
    assert len(graphs) == 2 and all("triton_kernel_wrapper_functional" in g for g in graphs)
    # 2 rows: the GEMV kernel (no GROUP_M), 40 rows: the tensor-core one.
    assert "'BLOCK_M': 2" in graphs[0] and "GROUP_M" not in graphs[0]
    assert "'BLOCK_M': 64" in graphs[1] and "'GROUP_M': 8" in graphs[1]


# ------------------------------------------------------------------------------------ GPU tier
def _bench(fn, iters: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("bits, group, sym, act_order", [(4, 128, True, False), (4, 128, False, True),
                                                         (8, 128, True, False), (4, 32, False, False),
                                                         (8, -1, False, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_matches_dense(bits, group, sym, act_order, dtype):
    if INTERPRETED:
        pytest.skip("kernels are interpreted in this process (TRITON_INTERPRET=1)")
    k, n = 2048, 1536
    layer = _layer(bits, group, sym, act_order, k=k, n=n, seed=3, device="cuda")
    w = _weight(layer)
    dense, bias = _dense(layer, dtype), layer.bias.float()
    for m in (1, 3, 8, 17, 64, 1000):
        x = torch.randn(m, k, device="cuda").to(dtype)
        assert _rel(w.matmul(x), x.float() @ dense.t() + bias) < TOL[dtype], m
        gy = torch.randn(m, n, device="cuda").to(dtype)
        assert _rel(w.grad_input(gy), gy.float() @ dense) < TOL[dtype], m


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_quant_linear_compiled_and_cuda_graphs_and_speed(capsys):
    if INTERPRETED:
        pytest.skip("kernels are interpreted in this process (TRITON_INTERPRET=1)")
    k, n = 4096, 4096
    layer = _layer(4, 128, True, True, k=k, n=n, seed=4, device="cuda")
    ref = copy.deepcopy(layer)
    ref.prepare(torch.device("cuda"), torch.float16, "dequant")
    assert layer.prepare(torch.device("cuda"), torch.float16) == "triton"  # the default on CUDA
    dense = layer.dequantized_weight(torch.float16)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True, dynamic=False)
    for m in (1, 16, 512):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            y_ref = ref(x).float()
            assert _rel(layer(x), y_ref) < 2e-3
            for _ in range(3):  # warm-up, capture, replay
                y_c = compiled(x).clone()
            assert _rel(y_c, y_ref) < 2e-3
            t_tri = _bench(lambda: layer(x))
            t_deq = _bench(lambda: ref(x))
            t_fp16 = _bench(lambda: torch.nn.functional.linear(x, dense))
        with capsys.disabled():
            print(f"\n[gpu speed, int4 g128 act-order {k}x{n}] M={m}: triton {t_tri:.3f} ms, dequant {t_deq:.3f} ms, "
                  f"fp16 F.linear {t_fp16:.3f} ms")
    x = torch.randn(4, 7, k, device="cuda", dtype=torch.float16, requires_grad=True)
    y = compiled(x)
    y.float().sum().backward()
    assert _rel(x.grad, torch.ones(4, 7, n, device="cuda").half().float() @ dense.float()) < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("group, act_order", [(32, False), (64, True), (128, False), (256, False), (-1, False)])
def test_gpu_tinygemm_cuda(group, act_order):
    k, n = 1024, 512
    layer = _layer(4, group, False, act_order, k=k, n=n, seed=6, device="cuda")
    ref = copy.deepcopy(layer)
    ref.prepare(torch.device("cuda"), torch.bfloat16, "dequant")
    layer.prepare(torch.device("cuda"), torch.bfloat16, "tinygemm-cuda")
    for m in (1, 33):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        assert _rel(layer(x), ref(x).float()) < 2e-2, m
