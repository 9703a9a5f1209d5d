"""The vLLM copy of a checkpoint (qwen/bench/vllm_parity.py): what it contains, checked here without vLLM, and
greedy parity with vLLM itself, checked when a vLLM interpreter exists ($QWEN_VLLM_PYTHON or
/work/vllm-venv/bin/python; docs/scale-out.md shows how to make one). The vLLM tests are slow (each vLLM start
takes 30-40 s on two CPU cores) and run with ``make test-slow``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from qwen.bench import vllm_parity as vp
from qwen.bench.common import build_model
from qwen.checkpoint import SafetensorsReader, save_model

SHAPE = {"hidden_size": 256, "num_attention_heads": 4, "kv_channels": 64, "intermediate_size": 1024}


def _vllm_python() -> str | None:
    for candidate in (os.environ.get(vp.VLLM_PYTHON_ENV), "/work/vllm-venv/bin/python"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


needs_vllm = pytest.mark.skipif(_vllm_python() is None, reason="no vLLM interpreter ($QWEN_VLLM_PYTHON)")


def _model(**overrides):
    # Larger weights than the official init and a 30x head: diverse greedy text with top-1/top-2 logit
    # margins of 0.08 and more, so that float32 rounding cannot flip a choice.
    model = build_model("tiny", 0, "float32", {**SHAPE, "initializer_range": 0.05, **overrides})
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vllm") / "float"
    save_model(_model(), path)  # seq_length 64, dynamic NTK and LogN on, as the tiny preset
    return path


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with SafetensorsReader(file) as r:
            out.update({k: r.read(k) for k in r.keys()})
    return out


# ------------------------------------------------------------------------------------------ without vLLM
def test_copy_is_a_transformers_qwen2_with_our_logits(checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    from qwen.auto import AutoModelForCausalLM

    copy = tmp_path / "copy"
    cfg = vp.write_vllm_checkpoint(checkpoint, copy, progress=False)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["intermediate_size"] == 512
    assert cfg["max_position_embeddings"] == 64 and cfg["qwen1_source"]["use_dynamic_ntk"] is True
    assert json.loads((copy / "generation_config.json").read_text())["eos_token_id"] == [151643, 151645]
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(copy), dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(str(checkpoint), progress=False).eval()
    ids = torch.randint(0, 151643, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours(ids).logits, atol=2e-4, rtol=1e-4)


def test_gptq_tensors_are_split_without_requantizing(checkpoint, tmp_path):
    from qwen.commands import quantize as quantize_cmd
    from qwen.quant.layout import dequantize

    src = tmp_path / "int4"
    assert quantize_cmd.main(["--model", str(checkpoint), "--output", str(src), "--method", "rtn", "--bits", "4",
                              "--group-size", "64", "--no-progress"]) == 0
    copy = tmp_path / "copy"
    cfg = vp.write_vllm_checkpoint(src, copy, progress=False)
    assert cfg["quantization_config"]["quant_method"] == "gptq" and (copy / "quantize_config.json").exists()
    a, b = _read_all(src), _read_all(copy)
    p, q = "transformer.h.1.attn.c_attn.", "model.layers.1.self_attn."
    whole = dequantize(a[p + "qweight"], a[p + "qzeros"], a[p + "scales"], a[p + "g_idx"], bits=4)
    parts = [dequantize(b[q + f"{n}.qweight"], b[q + f"{n}.qzeros"], b[q + f"{n}.scales"], b[q + f"{n}.g_idx"], bits=4)
             for n in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(torch.cat(parts, dim=0), whole)
    assert torch.equal(torch.cat([b[q + f"{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")]), a[p + "bias"])
    # The zero biases the GPTQ layout keeps for bias-free layers are gone; the MLP names follow Qwen2.
    assert "model.layers.1.self_attn.o_proj.bias" not in b
    assert torch.equal(b["model.layers.1.mlp.gate_proj.qweight"], a["transformer.h.1.mlp.w2.qweight"])
    assert torch.equal(b["model.layers.1.mlp.up_proj.qweight"], a["transformer.h.1.mlp.w1.qweight"])


def test_sharded_copy_without_tokenizer_for_a_small_vocabulary(tmp_path):
    transformers = pytest.importorskip("transformers")
    src = tmp_path / "src"
    model = build_model("tiny-vocab", 1, "float32", {})
    save_model(model, src)
    copy = tmp_path / "copy"
    assert vp.main(["--model", str(src), "--export-to", str(copy), "--export-only"]) == 0
    vp.write_vllm_checkpoint(src, copy, max_shard_size="200KB", progress=False)  # replaces the first copy
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert sorted(p.name for p in copy.glob("*.safetensors")) == shards
    # The bundled tokenizer's ids (up to 151850) do not fit a 512-row embedding: no tokenizer files.
    assert not (copy / "tokenizer.json").exists()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(copy), dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model(ids).logits, atol=2e-4, rtol=1e-4)


def test_act_order_with_static_groups_is_written_as_plain_gptq(tmp_path):
    """vLLM 0.32 refuses desc_act=True; with --static-groups g_idx is k // group_size, i.e. the plain layout."""
    from qwen.commands import quantize as quantize_cmd

    small = tmp_path / "small"
    save_model(build_model("tiny", 0, "float32", {}), small)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Sample {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(4)))
    for flags, plain in ((["--static-groups"], True), ([], False)):
        src = tmp_path / f"act-order-{plain}"
        assert quantize_cmd.main(["--model", str(small), "--output", str(src), "--bits", "4", "--group-size", "32",
                                  "--desc-act", *flags, "--calib", str(calib), "--no-progress"]) == 0
        cfg = vp.write_vllm_checkpoint(src, tmp_path / f"copy-{plain}", progress=False)
        assert cfg["quantization_config"]["desc_act"] is (not plain)
        assert json.loads((tmp_path / f"copy-{plain}" / "quantize_config.json").read_text())["desc_act"] is (not plain)
        assert any("desc_act" in note for note in vp.vllm_limits(cfg)) is (not plain)


def test_known_vllm_limits():
    base = {"max_position_embeddings": 8192, "qwen1_source": {"seq_length": 8192, "use_dynamic_ntk": True}}
    assert vp.vllm_limits(base) == []
    assert "dynamic NTK" in vp.vllm_limits({**base, "max_position_embeddings": 32768})[0]
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    assert vp.vllm_limits({**base, "quantization_config": gptq}) == []
    assert "symmetric" in vp.vllm_limits({**base, "quantization_config": {**gptq, "sym": False}})[0]
    assert "CPU kernel is 4-bit" in vp.vllm_limits({**base, "quantization_config": {**gptq, "bits": 8}})[0]


@pytest.mark.parametrize("override, message", [
    ({"rotary_pct": 0.5}, "rotary_pct"),
    ({"use_window_attn": True}, "use_window_attn"),
])
def test_shapes_vllm_cannot_express_are_refused(tmp_path, override, message):
    src = tmp_path / "src"
    save_model(build_model("tiny-vocab", 0, "float32", override), src)
    with pytest.raises(vp.VLLMExportError, match=message):
        vp.write_vllm_checkpoint(src, tmp_path / "copy", progress=False)
    assert not (tmp_path / "copy").exists()


def test_tokenizer_json_encodes_as_qwen_tiktoken():
    tokenizers = pytest.importorskip("tokenizers")
    from qwen.tokenizer import QWenTokenizer

    tok = QWenTokenizer()
    hf = tokenizers.Tokenizer.from_str(json.dumps(vp.tokenizer_json(tok)))
    calibration = Path(__file__).resolve().parents[1] / "qwen" / "assets" / "calibration.jsonl"
    texts = [line for line in calibration.read_text("utf-8").splitlines()[:60]]
    texts += ["  two  spaces\n\n\tand tabs  ", "I'M sure they'LL", "价格是12345.67元", "emoji 😀🎉 and e\u0301",
              "\r\n\r\n  x", " " * 40 + "y", "<|im_start|>user\nhi<|im_end|>\n<|extra_7|>", "x = {'a': [1, 2]}  # c"]
    for text in texts:
        ours = tok.encode(text, allowed_special="all")
        assert hf.encode(text, add_special_tokens=False).ids == ours, text[:60]
        assert hf.decode(ours, skip_special_tokens=False) == tok.decode(ours)


def test_chat_template_renders_the_official_chatml_prompt():
    jinja2 = pytest.importorskip("jinja2")
    from qwen.chat_template import make_context
    from qwen.tokenizer import QWenTokenizer

    template = jinja2.Environment().from_string(vp.CHAT_TEMPLATE)
    tok = QWenTokenizer()
    history = [("你好", "你好！有什么可以帮你？")]
    messages = [{"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！有什么可以帮你？"},
                {"role": "user", "content": "1+1=?"}]
    for system in (None, "You are a pirate."):
        head = [] if system is None else [{"role": "system", "content": system}]
        text = template.render(messages=head + messages, add_generation_prompt=True)
        expected, _ = make_context(tok, "1+1=?", history=history, system=system or vp.DEFAULT_SYSTEM)
        # make_context stops after "<|im_start|>assistant\n"; the template ends each turn with "\n" too.
        assert text == expected


# ------------------------------------------------------------------------------------------ with vLLM
@pytest.mark.slow
@needs_vllm
def test_float32_greedy_tokens_equal_vllm(checkpoint, tmp_path):
    """32 greedy tokens of four prompts, identical in vLLM; and vLLM ignores dynamic NTK and LogN: our model
    told that its training context is 16 tokens (they switch on past it) agrees with vLLM only up to there."""
    from qwen.auto import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    prompts = [tok.encode(p) for p in vp.DEFAULT_PROMPTS]
    copy = tmp_path / "copy"
    vp.write_vllm_checkpoint(checkpoint, copy, progress=False)
    theirs = vp.vllm_greedy(copy, prompts, 32, vllm_python=_vllm_python(), dtype="float32",
                            log_file=tmp_path / "vllm.log")
    ours = vp.our_greedy(AutoModelForCausalLM.from_pretrained(str(checkpoint), progress=False).eval(), prompts, 32)
    results = [vp.compare_tokens(t, len(p), o, v) for t, p, o, v in zip(vp.DEFAULT_PROMPTS, prompts, ours,
                                                                         theirs["results"])]
    print(vp.format_table(results))
    assert all(r.ok for r in results), vp.format_table(results)
    assert max(r.max_logprob_diff for r in results) < 1e-3
    assert min(len(set(r.ours)) for r in results) >= 16  # not a degenerate repetition

    short = AutoModelForCausalLM.from_pretrained(str(checkpoint), progress=False, seq_length=16).eval()
    for p, o_short, v in zip(prompts, vp.our_greedy(short, prompts, 32), theirs["results"]):
        below = 16 - len(p)  # new tokens whose logits come from positions < 16
        assert o_short["tokens"][:below + 1] == v["tokens"][:below + 1]
    full = [o["logits"] for o in ours]
    changed = [float((s["logits"][16 - len(p):] - f[16 - len(p):]).abs().max())
               for p, s, f in zip(prompts, vp.our_greedy(short, prompts, 32), full)]
    assert min(changed) > 1e-2  # NTK/LogN did change our logits past 16 tokens, where vLLM's stay put


@pytest.mark.slow
@needs_vllm
def test_gptq_int4_from_qwen_quantize_runs_in_vllm(checkpoint, tmp_path):
    from qwen.commands import quantize as quantize_cmd

    src = tmp_path / "int4"
    assert quantize_cmd.main(["--model", str(checkpoint), "--output", str(src), "--bits", "4", "--group-size", "64",
                              "--num-samples", "16", "--max-len", "128", "--no-progress"]) == 0
    out = vp.compare(src, max_new_tokens=32, vllm_python=_vllm_python(), log_file=tmp_path / "vllm.log")
    results = out["results"]
    print(vp.format_table(results))
    assert out["dtype"] == "float16" and out["vllm"]["quantization"] in ("gptq", "auto_gptq", "gptq_marlin")
    # vLLM runs GPTQ with float16 activations and we in float32: equal up to 16-bit rounding. A divergence is
    # only acceptable at a near-tie, after a long common prefix.
    for r in results:
        assert r.ok or (r.matched >= 8 and r.our_gap is not None and r.our_gap < 0.5), vp.format_table(results)
        assert r.max_logprob_diff < 0.3, vp.format_table(results)


@pytest.mark.slow
@needs_vllm
def test_gptq_int8_in_vllm_cpu(checkpoint, tmp_path):
    """vLLM 0.32's CPU kernel for GPTQ (CPUWNA16) does 4-bit only; the 8-bit checkpoint needs a GPU (Marlin).
    Skips with vLLM's reason where it refuses, checks parity where it runs."""
    from qwen.commands import quantize as quantize_cmd

    src = tmp_path / "int8"
    assert quantize_cmd.main(["--model", str(checkpoint), "--output", str(src), "--method", "rtn", "--bits", "8",
                              "--group-size", "64", "--no-progress"]) == 0
    try:
        out = vp.compare(src, max_new_tokens=16, vllm_python=_vllm_python(), log_file=tmp_path / "vllm.log")
    except vp.VLLMRunError as e:
        if "uint8" in str(e):
            pytest.skip(f"vLLM cannot run 8-bit GPTQ on this machine: {str(e).splitlines()[0][-200:]}")
        raise
    for r in out["results"]:
        assert r.ok or (r.matched >= 4 and r.our_gap is not None and r.our_gap < 0.5), vp.format_table(out["results"])
