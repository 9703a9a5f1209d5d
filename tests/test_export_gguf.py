"""GGUF export (qwen/export_gguf.py, `qwen export --format gguf`): read back with gguf's reader, run by llama.cpp.

The metadata, tensors and vocabulary are checked with ``gguf.GGUFReader`` (llama.cpp's Python reader);
the merges with a small BPE written here the way llama.cpp applies them (lowest-ranked adjacent pair
first). The llama.cpp tests (skipped without llama-cpp-python) load the files, tokenize the same texts
and greedy-decode the same tokens as our engine.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import regex
import torch

from qwen import AutoModelForCausalLM
from qwen.checkpoint import init_checkpoint
from qwen.cli import main as cli_main
from qwen.export_gguf import BYTE_CHARS, CHAT_TEMPLATE, GGUFExportError, export_gguf, token_text
from qwen.generate import generate
from qwen.generation_config import GenerationConfig
from qwen.quant import GPTQConfig, quantize_model
from qwen.quant.layout import dequantize
from qwen.tokenizer import PAT_STR, SPECIAL_TOKENS, QWenTokenizer

gguf = pytest.importorskip("gguf")

TEXTS = [
    "Hello, world! 你好，世界。",
    "def square(x):\n    return x ** 2  # comment\n\n\n\tindented\r\n",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧 ok",
    "数字 1234567 和 3.14159，温度-5°C",
    "  leading spaces,   inner   runs and trailing   ",
    "I'm sure they'RE here, we'll see; it's DONE",
    "Ünïcödé façade naïve — “quotes” ‘single’ «guillemets»",
    "日本語のテキストと한국어 텍스트와 Ελληνικά και русский",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "text <|endoftext|> more <|extra_12|>!",
]
UNICODE_OF = {c: b for b, c in enumerate(BYTE_CHARS)}
LINEAR_NAMES = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.w1": "ffn_up", "mlp.w2": "ffn_gate",
                "mlp.c_proj": "ffn_down"}


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random tiny model (hidden 64, 2 layers, the real vocabulary), fp32, untied, seq_length 256."""
    path = tmp_path_factory.mktemp("gguf") / "tiny"
    init_checkpoint("tiny", path, seed=3, dtype=torch.float32, seq_length=256)
    return path


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf-out")
    made = {}
    for kind in ("f32", "q8_0", "q4_0"):
        made[kind] = out / f"tiny-{kind}.gguf"
        result = export_gguf(tiny, made[kind], type=kind, progress=False)
        assert result.path == str(made[kind]) and result.tensors == 1 + 2 * 8 + 2
    return made


_READERS: dict[Path, object] = {}


def reader(path: Path):  # GGUFReader takes ~10 s on the full vocabulary: read each file once
    if path not in _READERS:
        _READERS[path] = gguf.GGUFReader(path)
    return _READERS[path]


def field(r, key: str):
    return r.fields[key].contents()


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def gguf_names(n_layers: int) -> dict[str, str]:
    """Official name -> GGUF name, written out by hand from llama.cpp's tensor_mapping.py."""
    names = {"transformer.wte.weight": "token_embd.weight", "transformer.ln_f.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(n_layers):
        p, q = f"transformer.h.{i}.", f"blk.{i}."
        names.update({p + "ln_1.weight": q + "attn_norm.weight", p + "attn.c_attn.weight": q + "attn_qkv.weight",
                      p + "attn.c_attn.bias": q + "attn_qkv.bias", p + "attn.c_proj.weight": q + "attn_output.weight",
                      p + "ln_2.weight": q + "ffn_norm.weight", p + "mlp.w1.weight": q + "ffn_up.weight",
                      p + "mlp.w2.weight": q + "ffn_gate.weight", p + "mlp.c_proj.weight": q + "ffn_down.weight"})
    return names


# ------------------------------------------------------------------------------------------- metadata, tensors
def test_f32_metadata_is_what_the_qwen_loader_reads(files, tiny, tok):
    r = reader(files["f32"])
    expected = {
        "general.architecture": "qwen", "general.file_type": 0, "general.quantization_version": 2,
        "general.name": "tiny", "general.type": "model",
        "qwen.context_length": 256, "qwen.embedding_length": 64, "qwen.block_count": 2,
        "qwen.feed_forward_length": 256,  # intermediate_size: llama.cpp halves it for Qwen
        "qwen.attention.head_count": 4, "qwen.attention.head_count_kv": 4,
        "qwen.rope.freq_base": 10000.0, "qwen.rope.dimension_count": 16,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.bos_token_id": 151643, "tokenizer.ggml.eos_token_id": 151643,
        "tokenizer.ggml.unknown_token_id": 151643, "tokenizer.ggml.padding_token_id": 151643,
        "tokenizer.ggml.eot_token_id": 151645,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    got = {k: field(r, k) for k in expected}
    assert got == expected
    assert field(r, "qwen.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert "dequantized" not in field(r, "general.description")
    # Every key: the ones above plus the three vocabulary arrays and the description.
    assert set(r.fields) - set(expected) == {
        "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "qwen.attention.layer_norm_rms_epsilon",
        "general.description", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}


def test_f32_tensors_equal_the_checkpoint(files, tiny):
    r = reader(files["f32"])
    state = checkpoint_tensors(tiny)
    names = gguf_names(2)
    by_name = {t.name: t for t in r.tensors}
    assert sorted(by_name) == sorted(names.values())
    for official, name in names.items():
        t = by_name[name]
        want = state[official].numpy()
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert [int(s) for s in t.shape] == list(reversed(want.shape)), name  # GGUF lists ne0 (columns) first
        assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), name


@pytest.mark.parametrize("kind, rel_rms", [("q8_0", 0.01), ("q4_0", 0.15)])
def test_quantized_tensors_are_within_quantization_error(files, tiny, kind, rel_rms):
    r = reader(files[kind])
    assert field(r, "general.file_type") == {"q8_0": 7, "q4_0": 2}[kind]
    state = checkpoint_tensors(tiny)
    qtype = gguf.GGMLQuantizationType.Q8_0 if kind == "q8_0" else gguf.GGMLQuantizationType.Q4_0
    for official, name in gguf_names(2).items():
        t = next(t for t in r.tensors if t.name == name)
        want = state[official].numpy()
        if want.ndim == 1:  # norms and the qkv bias stay exact
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(np.asarray(t.data), want), name
            continue
        # q4_0 keeps the output matrix in q8_0 (llama-quantize would use q6_K, which gguf-py cannot write).
        expected_type = gguf.GGMLQuantizationType.Q8_0 if name == "output.weight" else qtype
        assert t.tensor_type == expected_type, name
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
        err = np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want ** 2))
        assert err < (0.01 if expected_type == gguf.GGMLQuantizationType.Q8_0 else rel_rms), (name, err)
        # Quantizing in row chunks gives the bytes of one call of gguf's quantizer (llama.cpp's reference code).
        assert np.array_equal(np.asarray(t.data).reshape(-1), gguf.quants.quantize(want, expected_type).reshape(-1))


def test_rows_that_are_not_whole_blocks_fall_back_to_f16(tmp_path):
    # The demo model's MLP is 344 wide: ffn_down rows (344 inputs) are not a multiple of 32.
    result = export_gguf("qwen-demo", tmp_path / "demo.gguf", type="q8_0", progress=False)
    assert result.tensor_types == {"Q8_0": 1 + 8 * 4 + 1, "F16": 8, "F32": 8 * 3 + 1}
    assert result.source == "float"


def test_f16_keeps_vectors_in_f32_and_ties_the_output(tmp_path):
    result = export_gguf("qwen-demo", tmp_path / "demo-f16.gguf", type="f16", progress=False)
    assert result.tensor_types == {"F16": 2 + 8 * 5, "F32": 8 * 3 + 1}  # token_embd + output (a copy: tied)


# ------------------------------------------------------------------------------------------- vocabulary
def _bpe_with_merges(piece: bytes, ranks: dict[tuple[str, str], int], ids: dict[str, int]) -> list[int]:
    """llama.cpp's BPE on one pre-tokenized piece: repeatedly merge the adjacent pair of lowest merge rank."""
    symbols = [BYTE_CHARS[b] for b in piece]
    while len(symbols) > 1:
        scored = [(ranks.get((a, b), 1 << 62), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        best, i = min(scored)
        if best == 1 << 62:
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [ids[s] for s in symbols]


def _encode_with_gguf_vocab(text: str, tokens: list[str], merges: list[str], special: bool) -> list[int]:
    ids = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    parts = regex.split("(" + "|".join(regex.escape(s) for s in SPECIAL_TOKENS) + ")", text) if special else [text]
    out: list[int] = []
    for part in parts:
        if special and part in SPECIAL_TOKENS:
            out.append(ids[part])
            continue
        for piece in regex.findall(PAT_STR, part):
            out += _bpe_with_merges(piece.encode("utf-8"), ranks, ids)
    return out


def test_vocabulary_round_trips(files, tok):
    r = reader(files["f32"])
    tokens, types, merges = (field(r, f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "merges"))
    assert len(tokens) == len(types) == 151936 and len(merges) == 151643 - 256
    for token, rank in tok.mergeable_ranks.items():
        assert bytes(UNICODE_OF[c] for c in tokens[rank]) == token
    assert tokens[151643:151646] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokens[151850] == "<|extra_204|>" and tokens[151851] == "[PAD151851]" and tokens[-1] == "[PAD151935]"
    assert set(types[:151643]) == {1} and set(types[151643:151851]) == {3} and set(types[151851:]) == {5}
    assert len(set(tokens)) == len(tokens)
    # Merges spell pairs of existing tokens, in rank order of the token they make.
    assert merges[:3] == ["Ġ Ġ", "ĠĠ ĠĠ", "i n"] and token_text(b"  ") == "ĠĠ"
    for text in TEXTS:
        assert _encode_with_gguf_vocab(text, tokens, merges, special=False) == tok.encode(text, allowed_special=set())
        assert _encode_with_gguf_vocab(text, tokens, merges, special=True) == tok.encode(text)


def test_chat_template_renders_chatml_like_render_messages(tok):
    jinja2 = pytest.importorskip("jinja2")
    from qwen.chat_template import render_messages

    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi there."},
                {"role": "user", "content": "2+2?"}]
    text = template.render(messages=messages, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                    "<|im_start|>assistant\nHi there.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert tok.encode(text) == render_messages(tok, messages)[0]
    own_system = [{"role": "system", "content": "Be brief."}] + messages[:1]
    text = template.render(messages=own_system, add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>"
    assert tok.encode(text) == render_messages(tok, own_system, add_generation_prompt=False)[0]


# ------------------------------------------------------------------------------------------- GPTQ
@pytest.fixture(scope="module")
def tiny_gptq(tiny, tmp_path_factory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(str(tiny), progress=False, cpu_packed_weights=False)
    quantize_model(model, GPTQConfig(bits=4, group_size=32), "rtn", progress=False)
    out = tmp_path_factory.mktemp("gguf-gptq") / "tiny-int4"
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def gptq_f32(tiny_gptq, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf-gptq-out") / "tiny-int4-f32.gguf"
    result = export_gguf(tiny_gptq, out, type="f32", progress=False)
    assert result.source == "GPTQ int4 (group size 32), dequantized"
    return out


def test_gptq_weights_are_dequantized(gptq_f32, tiny_gptq):
    r = reader(gptq_f32)
    assert "GPTQ int4 (group size 32), dequantized" in field(r, "general.description")
    state = checkpoint_tensors(tiny_gptq)
    by_name = {t.name: t for t in r.tensors}
    for official, name in gguf_names(2).items():
        t = by_name[name]
        prefix = official.removesuffix(".weight")
        if prefix + ".qweight" in state:
            want = dequantize(*(state[f"{prefix}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")), bits=4)
        else:
            want = state[official].float()
        assert np.array_equal(np.asarray(t.data).reshape(want.shape), want.numpy()), name
    # ...and equal to the float weights our own GPTQ layers compute with.
    from qwen.quant.linear import dequantize_layer_to_linear, quant_linear_layers

    model = AutoModelForCausalLM.from_pretrained(str(tiny_gptq), progress=False)
    for layer_name, layer in quant_linear_layers(model):
        i, module = layer_name.split(".h.")[1].split(".", 1)
        name = f"blk.{i}.{LINEAR_NAMES[module]}.weight"
        w = dequantize_layer_to_linear(layer).weight.detach().numpy()
        assert np.array_equal(np.asarray(by_name[name].data).reshape(w.shape), w), name


def test_gptq_to_q8_0(tiny_gptq, tmp_path):
    result = export_gguf(tiny_gptq, tmp_path / "int4-q8.gguf", type="q8_0", progress=False)
    assert result.tensor_types == {"Q8_0": 2 + 2 * 5, "F32": 2 * 3 + 1}


# ------------------------------------------------------------------------------------------- errors, CLI
def test_errors_name_the_problem(tmp_path, tiny):
    with pytest.raises(GGUFExportError, match="unknown GGUF type 'q5_k'"):
        export_gguf(tiny, tmp_path / "x.gguf", type="q5_k")
    with pytest.raises(GGUFExportError, match="does not exist"):
        export_gguf(tiny, tmp_path / "missing" / "x.gguf", type="f32")
    small = tmp_path / "small-vocab"
    init_checkpoint("tiny-vocab", small, seed=0, dtype=torch.float32)
    with pytest.raises(GGUFExportError, match="vocab_size is 512"):
        export_gguf(small, tmp_path / "x.gguf", type="f32", progress=False)
    biased = tmp_path / "biased"
    init_checkpoint("tiny", biased, seed=0, dtype=torch.float32, no_bias=False, num_hidden_layers=1)
    from safetensors.torch import save_file

    state = checkpoint_tensors(biased)
    assert not state["transformer.h.0.attn.c_proj.bias"].any()  # zero biases export (they are dropped)...
    export_gguf(biased, tmp_path / "zero-bias.gguf", type="f32", progress=False)
    (tmp_path / "zero-bias.gguf").unlink()
    state["transformer.h.0.attn.c_proj.bias"][3] = 0.5  # ...a real one cannot
    save_file(state, str(biased / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GGUFExportError, match=r"'transformer.h.0.attn.c_proj.bias' is a non-zero bias"):
        export_gguf(biased, tmp_path / "x.gguf", type="f32", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["biased", "small-vocab"]  # no temp files left behind


def test_q4_k_m_without_llama_cpp_says_what_to_install(tmp_path, tiny, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_llama(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "llama_cpp":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    with pytest.raises(GGUFExportError, match="llama-cpp-python"):
        export_gguf(tiny, tmp_path / "x.gguf", type="q4_k_m", progress=False)
    assert os.listdir(tmp_path) == []


def test_cli(tmp_path, tiny, capsys):
    out = tmp_path / "tiny.gguf"
    assert cli_main(["export", "--format", "gguf", "--model", str(tiny), "--type", "q8_0", "--output", str(out),
                     "--no-progress"]) == 0
    assert out.exists() and "q8_0, 19 tensors" in capsys.readouterr().out
    assert cli_main(["export", "--format", "gguf", "--model", str(tmp_path / "nope"), "--output", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["export", "--format", "gguf", "--model", str(tiny), "--type", "q3", "--output", str(out)])
    with pytest.raises(SystemExit):
        cli_main(["export", "--format", "onnx", "--model", str(tiny), "--output", str(out)])


# ------------------------------------------------------------------------------------------- llama.cpp itself
_OPEN_LLAMAS: list = []


@pytest.fixture(scope="module", autouse=True)
def _close_llamas():
    yield
    while _OPEN_LLAMAS:  # explicitly, before interpreter shutdown tears down the C bindings
        _OPEN_LLAMAS.pop().close()


def _llama(path: Path, **kwargs):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, **kwargs)
    _OPEN_LLAMAS.append(llm)
    return llm


def _our_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = generate(model, torch.tensor([prompt]), generation_config=GenerationConfig(), max_new_tokens=n)
    return out[0, len(prompt):].tolist()


def _llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == n or llm.token_eos() == token:
            break
    return out


def _llama_logits(llm, prompt: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(prompt)
    return np.array(llm.scores[llm.n_tokens - 1])


def test_llama_cpp_tokenizes_like_us(files, tok):
    llm = _llama(files["f32"], vocab_only=True)
    for text in TEXTS + ["a" * 3000 + " " + "字" * 500]:
        plain = tok.encode(text, allowed_special=set())
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == plain, text
        ids = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert llm.detokenize(ids, special=True) == text.encode(), text


@pytest.fixture(scope="module")
def demo_f32(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf-demo") / "demo-f32.gguf"
    export_gguf("qwen-demo", out, type="f32", progress=False)
    return out


PROMPTS = ["Hello, world!", "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n", "def f(x):\n    return"]


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_llama_cpp_greedy_decodes_our_tokens(which, files, tiny, demo_f32, tok):
    path, model_dir = (files["f32"], tiny) if which == "tiny" else (demo_f32, "qwen-demo")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), progress=False, torch_dtype=torch.float32).eval()
    llm = _llama(path, logits_all=True)
    for text in PROMPTS:
        prompt = tok.encode(text)
        ours = _our_greedy(model, prompt, 32)
        assert _llama_greedy(llm, prompt, 32) == ours, text
        with torch.no_grad():
            want = model(torch.tensor([prompt])).logits[0, -1].numpy()
        got = _llama_logits(llm, prompt)
        assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max()), text


def test_llama_cpp_q8_0_stays_close(files, tiny, tok):
    model = AutoModelForCausalLM.from_pretrained(str(tiny), progress=False).eval()
    llm = _llama(files["q8_0"], logits_all=True)
    for text in PROMPTS:
        prompt = tok.encode(text)
        with torch.no_grad():
            want = model(torch.tensor([prompt])).logits[0, -1].numpy()
        got = _llama_logits(llm, prompt)
        cos = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
        assert cos > 0.99, (text, cos)
        assert _llama_greedy(llm, prompt, 4)[0] == _our_greedy(model, prompt, 1)[0], text


def test_llama_cpp_runs_the_dequantized_gptq_model_like_our_gptq_engine(gptq_f32, tiny_gptq, tok):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gptq), progress=False).eval()
    llm = _llama(gptq_f32, logits_all=True)
    for text in PROMPTS:
        prompt = tok.encode(text)
        with torch.no_grad():
            want = model(torch.tensor([prompt])).logits[0, -1].numpy()
        got = _llama_logits(llm, prompt)
        assert np.abs(got - want).max() < 2e-2 * max(1.0, np.abs(want).max()), text
        assert _llama_greedy(llm, prompt, 8)[:4] == _our_greedy(model, prompt, 8)[:4], text


def test_q4_k_m_through_llama_cpp_quantizer(tiny, tmp_path, tok):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "tiny-q4_k_m.gguf"
    result = export_gguf(tiny, out, type="q4_k_m", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["tiny-q4_k_m.gguf"]  # the f32 intermediate is gone
    r = gguf.GGUFReader(out)
    assert r.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert "Q4_K" in result.tensor_types or "Q5_0" in result.tensor_types, result.tensor_types
    llm = _llama(out, logits_all=True)
    model = AutoModelForCausalLM.from_pretrained(str(tiny), progress=False).eval()
    prompt = tok.encode(PROMPTS[0])
    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0, -1].numpy()
    got = _llama_logits(llm, prompt)
    assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) > 0.9


def test_llama_cpp_known_tokenizer_differences(files, tok):
    """Two places where llama.cpp cannot tokenize as Qwen does (docs/gguf.md): pinned so a change shows."""
    import unicodedata

    llm = _llama(files["f32"], vocab_only=True)
    # 1. No NFC normalisation: decomposed text gives other ids, unless the caller normalises first.
    nfd = unicodedata.normalize("NFD", "café naïve")
    assert llm.tokenize(nfd.encode(), add_bos=False, special=False) != tok.encode(nfd, allowed_special=set())
    nfc = unicodedata.normalize("NFC", nfd).encode()
    assert llm.tokenize(nfc, add_bos=False, special=False) == tok.encode(nfd, allowed_special=set())
    # 2. llama.cpp promotes the ordinary BPE token "</s>" (128247) to a control, end-of-generation token by
    # its text, so with special=True it is split out of the text; with special=False nothing changes.
    text = "x</s>y"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == [87, 128247, 88] != tok.encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text) == [87, 522, 82, 82244]
