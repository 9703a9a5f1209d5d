"""GPTQ and round-to-nearest: the algorithm, model-level quality on the demo model, determinism,
save/load round trips and the ``qwen quantize`` command."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Iterator

import pytest
import torch

from qwen import AutoModelForCausalLM, AutoTokenizer
from qwen.checkpoint import init_checkpoint
from qwen.commands import quantize as quantize_cmd
from qwen.config import preset_config
from qwen.model import QWenLMHeadModel
from qwen.quant import GPTQConfig, QuantConfigError, quantize_model
from qwen.bench.quant_accuracy import demo_texts, perplexity
from qwen.quant.gptq import HessianAccumulator, check_quantizable, quantize_gptq, quantize_rtn
from qwen.quant.linear import quant_linear_layers


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    # Small ops dominate here (the GPTQ column loop, a 128-wide model); on a busy 2-core machine two
    # threads mostly wait for each other (measured: 5x slower fixtures under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ one layer
def _correlated_inputs(k: int, rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) * 0.3 + torch.eye(k)
    scale = torch.rand(k, generator=gen) * 3 + 0.1  # some inputs matter much more than others
    return (torch.randn(rows, k, generator=gen) @ mix) * scale


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_beats_round_to_nearest_on_the_layer_objective(desc_act: bool) -> None:
    n, k = 96, 256
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.05
    x = _correlated_inputs(k, 2048, 1)
    acc = HessianAccumulator(k)
    for chunk in x.split(500):  # the running mean must not depend on how the rows arrive
        acc.add(chunk)
    assert torch.allclose(acc.hessian, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-3)

    def output_error(res) -> float:  # type: ignore[no-untyped-def]
        return float(((x @ (res.dequantize() - w).t()) ** 2).mean())

    for group_size in (32, -1):
        rtn = quantize_rtn(w, 4, group_size)
        gptq = quantize_gptq(w, acc.hessian, 4, group_size, desc_act=desc_act)
        assert output_error(gptq) < 0.6 * output_error(rtn), group_size
        assert int(gptq.q.min()) >= 0 and int(gptq.q.max()) <= 15
    if desc_act:
        gptq = quantize_gptq(w, acc.hessian, 4, 32, desc_act=True)
        # Groups follow the act-order processing order: g_idx is a non-trivial permutation of k // 32.
        assert not torch.equal(gptq.g_idx, torch.arange(k, dtype=torch.int32) // 32)
        assert torch.equal(gptq.g_idx.sort().values, torch.arange(k, dtype=torch.int32) // 32)
        static = quantize_gptq(w, acc.hessian, 4, 32, desc_act=True, static_groups=True)
        assert torch.equal(static.g_idx, torch.arange(k, dtype=torch.int32) // 32)


def test_lazy_batches_equal_column_by_column_updates(monkeypatch) -> None:
    """Blocking is only a cache optimisation (paper §3, step 2): block size 1 gives the same codes."""
    import qwen.quant.gptq as gptq

    n, k = 48, 128
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(4))
    acc = HessianAccumulator(k)
    acc.add(_correlated_inputs(k, 512, 5))
    blocked = quantize_gptq(w, acc.hessian, 4, -1, desc_act=True)
    monkeypatch.setattr(gptq, "BLOCK_SIZE", 1)
    assert gptq._block_size(k) == 1
    unblocked = quantize_gptq(w, acc.hessian, 4, -1, desc_act=True)
    same = float((blocked.q == unblocked.q).float().mean())
    assert same > 0.995, same  # float rounding may flip a code that sits exactly between two levels
    assert torch.equal(blocked.scales, unblocked.scales)


def test_gptq_handles_dead_inputs_and_is_deterministic() -> None:
    n, k = 32, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2))
    x = _correlated_inputs(k, 256, 3)
    x[:, 5] = 0  # an input that is never active
    acc = HessianAccumulator(k)
    acc.add(x)
    a = quantize_gptq(w, acc.hessian, 4, 16, desc_act=True)
    b = quantize_gptq(w, acc.hessian, 4, 16, desc_act=True)
    for name in ("q", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert bool((a.dequantize()[:, 5] == 0).all())


# ------------------------------------------------------------------------------------ demo model
def _demo_texts() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Calibration and held-out evaluation sequences: alternate documents of the demo's training text.

    Evaluation cost is dominated by the 152k-word softmax: ~6k held-out tokens. Below ~4k tokens the
    RTN/GPTQ gap ratio (previous demo model) moved between 0.14 and 0.46 with the calibration set; at 12k
    tokens it stays between 0.13 and 0.29 (GPTQ with desc_act: 0.13-0.16)."""
    return demo_texts(AutoTokenizer.from_pretrained("qwen-demo"))


def _perplexity(model: QWenLMHeadModel, texts: list[torch.Tensor]) -> float:
    return perplexity(model, texts)


def test_chunked_perplexity_through_the_cache_equals_one_pass(demo) -> None:
    model, _, evaluation = demo
    texts = evaluation[:3]
    one_pass = perplexity(model, texts)
    assert abs(perplexity(model, texts, chunk=16) / one_pass - 1) < 1e-5


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    model = AutoModelForCausalLM.from_pretrained("qwen-demo", cpu_packed_weights=False, progress=False)
    calibration, evaluation = _demo_texts()
    return model, calibration, evaluation


@pytest.fixture(scope="module")
def demo_results(demo):  # type: ignore[no-untyped-def]
    """Held-out perplexity of the demo model: float vs RTN vs GPTQ, per-row groups (-1).

    The demo's layers have 128 or 344 inputs, so the group sizes that divide both are 8, 4, 2, 1
    and -1 (one group per output row). -1 is the setting of the GPTQ paper's headline results and
    where the method matters most: tiny groups make round-to-nearest nearly lossless already.
    """
    base, calibration, evaluation = demo
    with one_thread():
        rows = {"float32": (_perplexity(base, evaluation), None)}
        models = {}
        # GPTQ int8 (+0.08%) is left out to keep this file under a minute on a busy 2-core machine.
        for label, method, bits in (("RTN int4", "rtn", 4), ("GPTQ int4", "gptq", 4), ("RTN int8", "rtn", 8)):
            model = copy.deepcopy(base)
            config = GPTQConfig(bits=bits, group_size=-1, desc_act=method == "gptq")
            quantize_model(model, config, method, calibration, progress=False)
            ppl = _perplexity(model, evaluation)
            rows[label] = (ppl, sorted({layer.kernel or "" for _, layer in quant_linear_layers(model)}))
            models[label] = model
    print("\nheld-out perplexity, demo model, group size -1 (one group per row), GPTQ with desc_act")
    for label, (ppl, kernels) in rows.items():
        gap = ppl / rows["float32"][0] - 1
        print(f"  {label:10s} {ppl:8.4f}  {gap:+7.2%}  {', '.join(kernels or [])}")
    return rows, models


def test_gptq_int4_is_closer_to_float_than_rtn_and_int8_is_near_lossless(demo_results) -> None:
    rows, _ = demo_results
    base = rows["float32"][0]
    rtn_gap = rows["RTN int4"][0] - base
    gptq_gap = rows["GPTQ int4"][0] - base
    assert rtn_gap > 0
    assert gptq_gap < 0.5 * rtn_gap, rows  # measured: 0.01 (this demo model), 0.13-0.29 (the previous one)
    assert abs(rows["RTN int8"][0] / base - 1) < 0.01, rows


def test_quantized_demo_round_trips_through_the_official_layout(demo_results, tmp_path) -> None:
    _, models = demo_results
    model = models["GPTQ int4"]
    ids = torch.tensor([[151644, 872, 198, 108386, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        expected = model(ids).logits
    out = tmp_path / "demo-int4"
    model.save_pretrained(str(out))
    names = sorted(os.listdir(out))
    assert "quantize_config.json" in names and "model.safetensors" in names
    assert not [n for n in names if n.startswith(".qwen-save-")]  # the staging directory is gone
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq" and cfg["quantization_config"]["bits"] == 4
    assert cfg["torch_dtype"] == "float16"
    quant = json.loads((out / "quantize_config.json").read_text())
    assert list(quant)[:6] == ["bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym"]
    loaded = AutoModelForCausalLM.from_pretrained(str(out), progress=False)
    assert {k: v.dtype for k, v in loaded.state_dict().items() if ".h.0.attn.c_attn." in k} == {
        "transformer.h.0.attn.c_attn.qweight": torch.int32, "transformer.h.0.attn.c_attn.qzeros": torch.int32,
        "transformer.h.0.attn.c_attn.scales": torch.float16, "transformer.h.0.attn.c_attn.g_idx": torch.int32,
        "transformer.h.0.attn.c_attn.bias": torch.float16}
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        got = loaded(ids).logits
    # The float parts are stored as fp16 (the demo's bf16 weights convert exactly).
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ determinism
def test_quantizing_twice_gives_identical_tensors() -> None:
    config = preset_config("tiny-vocab")
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, 512, (40,), generator=gen) for _ in range(4)]
    states = []
    for _ in range(2):
        model = QWenLMHeadModel(config)
        model.init_weights(seed=5)
        with one_thread():
            quantize_model(model, GPTQConfig(bits=4, group_size=32, desc_act=True), "gptq", calibration,
                           progress=False)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        a, b = states[0][name], states[1][name]
        assert a.dtype == b.dtype and a.contiguous().numpy().tobytes() == b.contiguous().numpy().tobytes(), name


def test_shapes_that_do_not_fit_are_rejected_with_the_valid_group_sizes() -> None:
    model = AutoModelForCausalLM.from_config(preset_config("tiny-vocab"))
    with pytest.raises(QuantConfigError, match=r"group_size 48 does not divide transformer\.h\.0\.attn\.c_attn's 64 "
                       r"inputs.*\[64, 32, 16, 8, 4, 2, 1\] or -1"):
        check_quantizable(model, GPTQConfig(bits=4, group_size=48))
    with pytest.raises(QuantConfigError, match="calibration"):
        quantize_model(model, GPTQConfig(), "gptq", [])
    with pytest.raises(QuantConfigError, match="method must be"):
        quantize_model(model, GPTQConfig(), "awq")


# ------------------------------------------------------------------------------------ command
def test_quantize_help(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        quantize_cmd.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--method", "--bits", "--group-size", "--desc-act", "--calib", "--output"):
        assert option in text


def test_quantize_command_end_to_end(tmp_path, capsys) -> None:
    src = tmp_path / "tiny"
    init_checkpoint("tiny", src, seed=0, dtype=torch.float32)
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps([
        {"id": f"s{i}", "conversations": [{"from": "user", "value": f"What is {i} + {i}?"},
                                          {"from": "assistant", "value": f"{i} + {i} = {2 * i}."}]}
        for i in range(6)]))
    out = tmp_path / "tiny-int4"
    rc = quantize_cmd.main(["--model", str(src), "--output", str(out), "--method", "gptq", "--bits", "4",
                            "--group-size", "32", "--desc-act", "--calib", str(calib), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "calibration: 6 sequences" in capsys.readouterr().err
    quant = json.loads((out / "quantize_config.json").read_text())
    assert (quant["bits"], quant["group_size"], quant["desc_act"], quant["sym"]) == (4, 32, True, True)
    model = AutoModelForCausalLM.from_pretrained(str(out), progress=False)
    layers = dict(quant_linear_layers(model))
    assert len(layers) == 2 * 5 and {layer.kernel for layer in layers.values()} == {"int4-tinygemm"}
    ids = AutoTokenizer.from_pretrained(str(out)).encode("What is 2 + 2?")
    with torch.no_grad():
        assert bool(torch.isfinite(model(torch.tensor([ids])).logits).all())

    out8 = tmp_path / "tiny-int8"
    assert quantize_cmd.main(["--model", str(src), "--output", str(out8), "--method", "rtn", "--bits", "8",
                              "--group-size", "-1", "--no-progress"]) == 0
    model8 = AutoModelForCausalLM.from_pretrained(str(out8), progress=False)
    assert {layer.kernel for _, layer in quant_linear_layers(model8)} == {"qwen-kernels"}


def test_quantize_command_errors(tmp_path, capsys) -> None:
    src = tmp_path / "tiny"
    init_checkpoint("tiny-vocab", src, seed=0, dtype=torch.float32)
    assert quantize_cmd.main(["--model", str(src), "--output", str(tmp_path / "o"), "--method", "rtn",
                              "--calib", str(tmp_path / "c.json")]) == 1
    assert "--calib is a GPTQ option" in capsys.readouterr().err
    assert quantize_cmd.main(["--model", str(src), "--output", str(tmp_path / "o"), "--method", "gptq",
                              "--group-size", "32", "--calib", str(tmp_path / "missing.json")]) == 1
    assert "missing.json" in capsys.readouterr().err
    assert quantize_cmd.main(["--model", str(src), "--output", str(tmp_path / "o"), "--method", "rtn",
                              "--group-size", "48"]) == 1
    assert "group_size 48 does not divide" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        quantize_cmd.main(["--model", str(src), "--output", str(tmp_path / "o"), "--bits", "3"])
    assert e.value.code == 2 and "invalid choice: 3" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_gptq_without_calib_uses_the_built_in_set(tmp_path, capsys) -> None:
    """As AutoGPTQ/optimum users expect: no --calib, GPTQ still runs, on the set shipped in the package
    (every sample by default; --num-samples takes the first N)."""
    from qwen.quant.calibration import DEFAULT_CALIBRATION, load_calibration

    src = tmp_path / "tiny"
    init_checkpoint("tiny", src, seed=0, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    built_in = load_calibration(None, tokenizer, max_len=512, num_samples=None)
    assert len(built_in) == sum(1 for line in DEFAULT_CALIBRATION.read_text("utf-8").splitlines() if line.strip())
    assert len(built_in) >= 300 and sum(len(t) for t in built_in) > 50_000 and max(map(len, built_in)) <= 512
    out = tmp_path / "q"
    assert quantize_cmd.main(["--model", str(src), "--output", str(out), "--bits", "4", "--group-size", "32",
                              "--max-len", "256", "--num-samples", "40", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "calibration: 40 sequences" in err and "the built-in calibration set" in err
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 4
    # A tokenizer whose ids do not fit the model is named, not an IndexError deep in the embedding.
    small = tmp_path / "small-vocab"
    init_checkpoint("tiny-vocab", small, seed=0, dtype=torch.float32)
    assert quantize_cmd.main(["--model", str(small), "--output", str(tmp_path / "q2"), "--group-size", "32",
                              "--no-progress"]) == 1
    assert "vocab_size" in capsys.readouterr().err and not (tmp_path / "q2").exists()
