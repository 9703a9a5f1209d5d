"""Export a Qwen (v1) checkpoint to GGUF, the file format of llama.cpp, as its "qwen" architecture.

llama.cpp has run first-generation Qwen since late 2023 (LLM_ARCH_QWEN): its converter,
``convert_hf_to_gguf.py`` (class ``QwenModel``), renames the official tensors, writes the hyper-parameters
and rebuilds the tokenizer from ``qwen.tiktoken`` through transformers' remote code. This module writes the
same kind of file from our own readers, without transformers, and with the ``gguf`` package (llama.cpp's
own writer, ``pip install gguf``), so any llama.cpp build (llama-cli, llama-server, llama-cpp-python,
ollama) loads it. What the loader needs, read from llama.cpp's ``src/models/qwen.cpp`` and
``src/llama-vocab.cpp``:

* tensors ``token_embd``, ``blk.N.attn_norm``, ``blk.N.attn_qkv`` (weight and bias: Qwen's fused
  c_attn, Q|K|V rows), ``blk.N.attn_output``, ``blk.N.ffn_norm``, ``blk.N.ffn_up`` (= ``mlp.w1``),
  ``blk.N.ffn_gate`` (= ``mlp.w2``: llama.cpp computes ``down(up(x) * silu(gate(x)))`` and Qwen's MLP is
  ``c_proj(w1(x) * silu(w2(x)))``), ``blk.N.ffn_down`` (= ``mlp.c_proj``), ``output_norm`` and
  ``output``. ``output`` is mandatory, so a model with tied embeddings gets a copy of ``token_embd``.
* ``qwen.feed_forward_length`` is config.json's ``intermediate_size`` (twice the MLP width): the loader
  halves it itself (``n_ff/2``), so writing the real width would make every MLP tensor mismatch.
* ``qwen.attention.layer_norm_rms_epsilon`` is required (the loader fails without it), RoPE is the
  NeoX (rotate-half) kind for this architecture, with ``qwen.rope.freq_base`` and
  ``qwen.rope.dimension_count``.
* the vocabulary as a GPT-2 style byte-level BPE (``tokenizer.ggml.model = "gpt2"``): one string per
  id, the bytes spelled with GPT-2's byte-to-unicode table, plus the merge list, which a .tiktoken file
  does not have. The merge that makes each token is found by running BPE over the token's own bytes
  with the ranks below its own, which leaves exactly two parts. The pre-tokenizer is ``"qwen2"``: the
  same split regex as Qwen-1's (there is no "qwen" entry), and it keeps spaces as they are. The 208
  specials are control tokens (parsed only when llama.cpp tokenizes with ``special=True``), the ids
  between the last special and ``vocab_size`` are unused ``[PADn]`` rows, ``<|endoftext|>`` is BOS, EOS,
  UNK and PAD, no BOS is added, and ``<|im_end|>`` is the end-of-turn token.

Deliberate differences from llama.cpp's converter: ``qwen.context_length`` is ``seq_length`` (the
training context), not ``max_position_embeddings``: beyond ``seq_length`` our engine (and the official
code) switch dynamic NTK and LogN on, which llama.cpp does not implement, so up to ``seq_length`` the two
engines compute the same thing and past it they do not. Current converters also write the norm epsilon
under the LayerNorm key, which the qwen loader does not read; we write the RMS key.

Types (``--type``): ``f32``; ``f16`` / ``bf16`` (matrices, 1-D tensors stay f32, as the converter);
``q8_0`` and ``q4_0`` (gguf-py's quantizers, the same bits as llama.cpp's; matrices whose rows are not a
multiple of 32 fall back to f16, as llama.cpp does; with q4_0 the output matrix is q8_0, where
llama-quantize would pick q6_K, which gguf-py cannot write); ``q4_k_m``: gguf-py cannot quantize K-quants,
so a float GGUF is written to a temporary file and llama.cpp's own quantizer (``llama_model_quantize``
from llama-cpp-python) turns it into Q4_K_M, exactly as ``llama-quantize``. GPTQ checkpoints (the official
Int4/Int8 ones, or ``qwen quantize``'s) are dequantized to float first and then stored in the requested
type: GGUF has no GPTQ layout, so a q4_0 file of a GPTQ model is quantized twice.

The file is written to ``OUTPUT.tmp-*`` next to the destination and renamed into place. Tensors are
streamed one at a time (peak memory: the largest tensor in float32 plus its encoding).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import CheckpointError, SafetensorsReader, find_weight_files, progress_bar
from .config import QWenConfig
from .hub import resolve_model_path

logger = logging.getLogger(__name__)

ARCH = "qwen"
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")
TOKENIZER_PRE = "qwen2"
# Identical to qwen/chat_template.py's render_messages (default system prompt, turns joined by "\n").
CHAT_TEMPLATE = (
    "{%- set ns = namespace(sep='') -%}"
    "{%- if not (messages and messages[0]['role'] == 'system') -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>' -}}{%- set ns.sep = '\\n' -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- ns.sep + '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' -}}"
    "{%- set ns.sep = '\\n' -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ns.sep + '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# Per block: official module -> GGUF name. Only c_attn has a bias in llama.cpp's qwen graph.
_BLOCK_LINEARS = {
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "mlp.w1": "ffn_up",
    "mlp.w2": "ffn_gate",
    "mlp.c_proj": "ffn_down",
}
_BLOCK_NORMS = {"ln_1": "attn_norm", "ln_2": "ffn_norm"}
# Buffers of older official revisions (causal mask, inv_freq): not weights. Dotted, so c_attn.bias never matches.
_IGNORED_SUFFIXES = (".attn.masked_bias", ".attn.bias", ".rotary_emb.inv_freq")
_GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
# Rows quantized per call: bounds the quantizer's temporaries for the big embedding matrices.
_QUANT_CHUNK_ELEMENTS = 1 << 24


class GGUFExportError(ValueError):
    """A checkpoint or request that cannot become a GGUF file (names the file, tensor or option)."""


@dataclass
class GGUFExport:
    """What ``export_gguf`` wrote."""

    path: str
    type: str
    source: str
    tensors: int
    tensor_types: dict[str, int] = field(default_factory=dict)
    size_bytes: int = 0
    seconds: float = 0.0


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("GGUF export needs the 'gguf' package (llama.cpp's writer): pip install 'gguf==0.19.0'") \
            from None
    return gguf


# ------------------------------------------------------------------------------------------- vocabulary
def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table, which llama.cpp's BPE uses for token texts.

    Bytes that are visible Latin-1 characters stand for themselves; the other 68 (controls, space,
    0x7f-0xa0, 0xad) are mapped in byte order onto U+0100 onwards.
    """
    visible = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, shifted = [], 0
    for b in range(256):
        if b in visible:
            out.append(chr(b))
        else:
            out.append(chr(0x100 + shifted))
            shifted += 1
    return out


BYTE_CHARS: list[str] = _byte_chars()


def token_text(token: bytes) -> str:
    """The GGUF spelling of a BPE token's bytes."""
    return "".join(BYTE_CHARS[b] for b in token)


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The pair BPE merges last to build ``token``: BPE over its bytes, using only ranks below ``rank``.

    None when BPE cannot reach the token (it then never appears in an encoding either).
    """
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            return None
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


_MERGES_CACHE: list[tuple[dict[bytes, int], list[str]]] = []


def bpe_merges(ranks: dict[bytes, int]) -> list[str]:
    """llama.cpp's merge list for tiktoken ranks: "left right" in GGUF spelling, in rank order.

    Takes a few seconds for Qwen's 151,643 ranks; the result for the last vocabulary seen is kept.
    """
    for cached_ranks, merges in _MERGES_CACHE:
        if cached_ranks is ranks:
            return merges
    merges, unreachable = [], 0
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        pair = _last_merge(token, rank, ranks)
        if pair is None:
            unreachable += 1
            continue
        merges.append(f"{token_text(pair[0])} {token_text(pair[1])}")
    if unreachable:
        logger.info("%d vocabulary entries cannot be built by BPE and get no merge", unreachable)
    _MERGES_CACHE[:] = [(ranks, merges)]
    return merges


@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    pad_id: int
    eot_id: int


def build_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """Token texts, token types and merges for a QWenTokenizer, padded to the embedding's ``vocab_size`` rows."""
    gguf = _gguf()
    ranks: dict[bytes, int] = tokenizer.mergeable_ranks
    specials: dict[str, int] = tokenizer.special_tokens
    top = max(max(ranks.values()), max(specials.values()))
    if top >= vocab_size:
        raise GGUFExportError(
            f"the tokenizer has ids up to {top} but the model's vocab_size is {vocab_size}: llama.cpp needs one "
            "embedding row per token, so this model and tokenizer cannot be exported together"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for token, rank in ranks.items():
        tokens[rank] = token_text(token)
        types[rank] = int(gguf.TokenType.NORMAL)
    for text, i in specials.items():
        tokens[i] = text
        types[i] = int(gguf.TokenType.CONTROL)
    eod = tokenizer.eod_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eod
    return GGUFVocab(tokens, types, bpe_merges(ranks), bos_id=eod, eos_id=eod, pad_id=pad,
                     eot_id=tokenizer.im_end_id)


# ------------------------------------------------------------------------------------------- tensors
class _Tensors:
    """Every tensor of a checkpoint by name, across shards, read on demand."""

    def __init__(self, path: str) -> None:
        kind, files = find_weight_files(path)
        self.where: dict[str, tuple[str, Any]] = {}
        self._open: list[SafetensorsReader] = []
        for file in files:
            if kind == "safetensors":
                reader: Any = SafetensorsReader(file)
                self._open.append(reader)
                names = reader.keys()
            else:
                try:
                    state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                except Exception as e:  # torch raises many types for corrupt pickles/zips
                    raise CheckpointError(f"{file}: cannot read PyTorch weights ({type(e).__name__}: {e})") from None
                reader = state
                names = list(state)
            for name in names:
                if name in self.where:
                    raise CheckpointError(f"{file}: tensor {name!r} is also in {self.where[name][0]}")
                self.where[name] = (file, reader)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def file(self, name: str) -> str:
        return self.where[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        reader = self.where[name][1]
        return tuple(reader.shape(name)) if isinstance(reader, SafetensorsReader) else tuple(reader[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        reader = self.where[name][1]
        return reader.dtype(name) if isinstance(reader, SafetensorsReader) else reader[name].dtype

    def read(self, name: str) -> torch.Tensor:
        reader = self.where[name][1]
        return reader.read(name) if isinstance(reader, SafetensorsReader) else reader[name]

    def float32(self, name: str) -> np.ndarray:
        return self.read(name).to(torch.float32).contiguous().numpy()

    def close(self) -> None:
        for reader in self._open:
            reader.close()


@dataclass
class _Planned:
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch order (rows, cols)
    qtype: Any  # gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]  # float32 values
    kind: str = "weight"  # embedding, output, weight, norm, bias


def _target_type(gguf: Any, gguf_type: str, kind: str, shape: tuple[int, ...]) -> Any:
    t = gguf.GGMLQuantizationType
    if len(shape) == 1 or gguf_type == "f32":
        return t.F32
    chosen = {"f16": t.F16, "bf16": t.BF16, "q8_0": t.Q8_0, "q4_0": t.Q4_0}[gguf_type]
    if gguf_type == "q4_0" and kind == "output":
        chosen = t.Q8_0  # llama-quantize uses q6_K for the output matrix; gguf-py cannot write K-quants
    if chosen in (t.Q8_0, t.Q4_0) and shape[-1] % gguf.GGML_QUANT_SIZES[chosen][0]:
        chosen = t.F16  # rows that are not whole blocks: llama.cpp falls back to f16 as well
    return chosen


def _encode(gguf: Any, values: np.ndarray, qtype: Any, name: str) -> np.ndarray:
    t = gguf.GGMLQuantizationType
    if qtype == t.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == t.F16:
        out = values.astype(np.float16)
        if not np.isfinite(out).all() and np.isfinite(values).all():
            raise GGUFExportError(f"tensor {name}: values beyond float16's range (|x| > 65504); use --type bf16 or f32")
        return out
    rows = values.reshape(-1, values.shape[-1]) if values.ndim > 1 else values.reshape(1, -1)
    byte_shape = gguf.quant_shape_to_byte_shape(rows.shape, qtype)
    out = np.empty(byte_shape, dtype=np.uint8)
    step = max(1, _QUANT_CHUNK_ELEMENTS // max(rows.shape[1], 1))
    for r in range(0, rows.shape[0], step):
        out[r:r + step] = gguf.quants.quantize(rows[r:r + step], qtype)
    return out.reshape(gguf.quant_shape_to_byte_shape(values.shape, qtype))


def _gptq_config(path: str, config: QWenConfig) -> Any:
    if not config.quantization_config:
        return None
    from .quant.layout import load_quant_config

    return load_quant_config(path, config.quantization_config)


def _plan(path: str, config: QWenConfig, tensors: _Tensors, gguf_type: str, gptq: Any) -> list[_Planned]:
    """Every GGUF tensor with its expected shape, type and how to compute it; errors for anything unusable."""
    gguf = _gguf()
    h, ff, v = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    used: set[str] = set()
    plan: list[_Planned] = []

    def check_shape(name: str, expected: tuple[int, ...]) -> None:
        got = tensors.shape(name)
        if got != expected:
            raise CheckpointError(
                f"{tensors.file(name)}: tensor {name!r} has shape {list(got)}, expected {list(expected)} from "
                f"{path}/config.json")

    def add(gguf_name: str, shape: tuple[int, ...], kind: str, produce: Callable[[], np.ndarray]) -> None:
        plan.append(_Planned(gguf_name, shape, _target_type(gguf, gguf_type, kind, shape), produce, kind))

    def float_tensor(name: str, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
        if name not in tensors:
            raise CheckpointError(f"{path}: the checkpoint has no tensor {name!r}")
        check_shape(name, shape)
        used.add(name)
        return lambda: tensors.float32(name)

    def linear(prefix: str, out_f: int, in_f: int) -> Callable[[], np.ndarray]:
        if prefix + ".qweight" not in tensors:
            return float_tensor(prefix + ".weight", (out_f, in_f))
        from .quant.layout import dequantize, expected_shapes

        shapes = expected_shapes(in_f, out_f, gptq.bits, gptq.group_size)
        for part in _GPTQ_PARTS:
            name = f"{prefix}.{part}"
            if name not in tensors:
                raise CheckpointError(f"{path}: GPTQ layer {prefix} has no tensor {name!r}")
            check_shape(name, shapes[part])
            used.add(name)
        names = [f"{prefix}.{part}" for part in _GPTQ_PARTS]
        return lambda: dequantize(*(tensors.read(n) for n in names), bits=gptq.bits).numpy()

    def bias_allowed_zero(prefix: str, out_f: int) -> None:
        name = prefix + ".bias"
        if name in tensors:
            check_shape(name, (out_f,))
            used.add(name)
            if bool(tensors.read(name).any()):
                raise GGUFExportError(
                    f"{tensors.file(name)}: tensor {name!r} is a non-zero bias; llama.cpp's qwen architecture has "
                    "biases on attn.c_attn only, so this model cannot be exported faithfully")

    if any(prefix + ".qweight" in tensors for prefix in ("lm_head", "transformer.wte")):
        raise GGUFExportError(f"{path}: quantized embeddings or lm_head are not supported (only the block linears)")
    if gptq is None and any(n.endswith(".qweight") for n in tensors.where):
        raise GGUFExportError(f"{path}: the weights hold GPTQ tensors (qweight) but config.json has no "
                              "quantization_config")

    add("token_embd.weight", (v, h), "embedding", float_tensor("transformer.wte.weight", (v, h)))
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}."
        shapes = {"attn.c_attn": (3 * h, h), "attn.c_proj": (h, h), "mlp.w1": (ff, h), "mlp.w2": (ff, h),
                  "mlp.c_proj": (h, ff)}
        add(f"blk.{i}.attn_norm.weight", (h,), "norm", float_tensor(p + "ln_1.weight", (h,)))
        for module, gguf_name in _BLOCK_LINEARS.items():
            out_f, in_f = shapes[module]
            add(f"blk.{i}.{gguf_name}.weight", (out_f, in_f), "weight", linear(p + module, out_f, in_f))
            if module == "attn.c_attn":
                add(f"blk.{i}.attn_qkv.bias", (3 * h,), "bias", float_tensor(p + "attn.c_attn.bias", (3 * h,)))
            else:
                bias_allowed_zero(p + module, out_f)
            if module == "attn.c_proj":
                add(f"blk.{i}.ffn_norm.weight", (h,), "norm", float_tensor(p + "ln_2.weight", (h,)))
    add("output_norm.weight", (h,), "norm", float_tensor("transformer.ln_f.weight", (h,)))
    if "lm_head.weight" in tensors:
        head = float_tensor("lm_head.weight", (v, h))
    elif config.tie_word_embeddings:
        head = float_tensor("transformer.wte.weight", (v, h))  # llama.cpp's qwen graph requires an output matrix
    else:
        raise CheckpointError(f"{path}: no lm_head.weight and tie_word_embeddings is false")
    add("output.weight", (v, h), "output", head)

    unknown = sorted(n for n in tensors.where if n not in used and not n.endswith(_IGNORED_SUFFIXES))
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise GGUFExportError(
            f"{tensors.file(unknown[0])}: tensors that llama.cpp's qwen architecture has no place for: "
            f"{unknown[:5]}{more}")
    return plan


# ------------------------------------------------------------------------------------------- writing
def _file_type(gguf: Any, gguf_type: str) -> int:
    f = gguf.LlamaFileType
    return int({"f32": f.ALL_F32, "f16": f.MOSTLY_F16, "bf16": f.MOSTLY_BF16, "q8_0": f.MOSTLY_Q8_0,
                "q4_0": f.MOSTLY_Q4_0, "q4_k_m": f.MOSTLY_Q4_K_M}[gguf_type])


def _add_metadata(writer: Any, gguf: Any, config: QWenConfig, vocab: GGUFVocab, gguf_type: str, name: str,
                  source: str) -> None:
    writer.add_type("model")
    writer.add_name(name)
    writer.add_description(f"Qwen (v1) exported by `qwen export --format gguf` from a {source} checkpoint")
    writer.add_file_type(_file_type(gguf, gguf_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.seq_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)  # llama.cpp halves it (Qwen's convention)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_attention_heads)
    writer.add_layer_norm_rms_eps(float(config.layer_norm_epsilon))
    writer.add_rope_freq_base(float(config.rotary_emb_base))
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.eos_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_eot_token_id(vocab.eot_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _write(out_path: str, config: QWenConfig, plan: list[_Planned], vocab: GGUFVocab, gguf_type: str, name: str,
           source: str, progress: bool) -> dict[str, int]:
    gguf = _gguf()
    t = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(None, ARCH)
    _add_metadata(writer, gguf, config, vocab, gguf_type, name, source)
    counts: dict[str, int] = {}
    for item in plan:
        if item.qtype in (t.F32, t.F16):
            dtype = np.float32 if item.qtype == t.F32 else np.float16
            nbytes = int(np.prod(item.shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(item.name, item.shape, np.dtype(dtype), nbytes)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(item.shape, item.qtype)
            writer.add_tensor_info(item.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                   raw_dtype=item.qtype)
        counts[item.qtype.name] = counts.get(item.qtype.name, 0) + 1
    writer.write_header_to_file(path=out_path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    bar = progress_bar(len(plan), f"gguf {gguf_type}", enabled=progress, unit="tensor", leave=False)
    try:
        for item in plan:
            writer.write_tensor_data(_encode(gguf, item.produce(), item.qtype, item.name))
            bar.update(1)
    finally:
        bar.close()
        writer.close()
    return counts


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise GGUFExportError(
            "--type q4_k_m needs llama.cpp's quantizer, which the gguf package does not have: "
            "pip install 'llama-cpp-python==0.3.36' (or export f16 and run llama.cpp's `llama-quantize FILE OUT "
            "Q4_K_M` yourself)") from None
    return llama_cpp


def _llama_cpp_quantize(src: str, dst: str, file_type: int) -> None:
    """llama.cpp's own quantizer (what llama-quantize runs), through llama-cpp-python's C bindings."""
    import ctypes

    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = 0  # all cores
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise GGUFExportError(f"llama.cpp's quantizer failed on {src} (return code {rc})")


def export_gguf(model: str | os.PathLike, output: str | os.PathLike, type: str = "f16", progress: bool = True,
                name: str | None = None) -> GGUFExport:
    """Write ``model`` (a float or GPTQ checkpoint directory, or "qwen-demo") as a GGUF file at ``output``.

    ``type``: one of GGUF_TYPES (see the module docstring). Returns what was written; raises
    GGUFExportError, CheckpointError, ConfigError or QuantConfigError with the file and tensor at fault.
    """
    from .tokenizer import QWenTokenizer

    if type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
    gguf = _gguf()
    if type == "q4_k_m":
        _llama_cpp()  # fail before writing anything
    start = time.perf_counter()
    path = resolve_model_path(model)
    if not os.path.isdir(path):
        raise GGUFExportError(f"{path}: expected a checkpoint directory")
    config = QWenConfig.from_pretrained(path)
    if any(w is not None for w in config.layer_windows):
        raise GGUFExportError(f"{path}/config.json: use_window_attn is set, and llama.cpp's qwen architecture has no "
                              "window attention; export from a config without it (the weights are the same)")
    gptq = _gptq_config(path, config)
    source = "float" if gptq is None else f"GPTQ int{gptq.bits} (group size {gptq.group_size}), dequantized"
    tokenizer = QWenTokenizer.from_pretrained(path)
    vocab = build_vocab(tokenizer, config.vocab_size)
    out = os.path.abspath(os.fspath(output))
    out_dir = os.path.dirname(out)
    if not os.path.isdir(out_dir):
        raise GGUFExportError(f"{out}: the directory {out_dir} does not exist")
    label = name or os.path.basename(os.path.normpath(path))

    tensors = _Tensors(path)
    staged: list[str] = []
    try:
        if type == "q4_k_m":
            # Full precision for llama.cpp's quantizer: bf16 when that is what the checkpoint holds (lossless).
            stored = {tensors.dtype(n) for n in tensors.where if n.endswith(".weight")} if gptq is None else set()
            first = "bf16" if stored == {torch.bfloat16} else "f32"
        else:
            first = type
        plan = _plan(path, config, tensors, first, gptq)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(out) + ".tmp-", dir=out_dir)
        os.close(fd)
        staged.append(tmp)
        counts = _write(tmp, config, plan, vocab, first, label, source, progress)
        if type == "q4_k_m":
            fd, quantized = tempfile.mkstemp(prefix=os.path.basename(out) + ".tmp-", dir=out_dir)
            os.close(fd)
            staged.append(quantized)
            _llama_cpp_quantize(tmp, quantized, _file_type(gguf, "q4_k_m"))
            counts = _tensor_types(quantized)
            tmp = quantized
        os.replace(tmp, out)
        staged.remove(tmp)
    finally:
        tensors.close()
        for leftover in staged:
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
    return GGUFExport(path=out, type=type, source=source, tensors=len(plan), tensor_types=counts,
                      size_bytes=os.path.getsize(out), seconds=time.perf_counter() - start)


def _tensor_types(path: str) -> dict[str, int]:
    reader = _gguf().GGUFReader(path)
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


__all__ = ["ARCH", "GGUF_TYPES", "TOKENIZER_PRE", "CHAT_TEMPLATE", "BYTE_CHARS", "GGUFExport", "GGUFExportError",
           "GGUFVocab", "bpe_merges", "build_vocab", "export_gguf", "token_text"]
