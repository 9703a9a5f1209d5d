"""Run our checkpoints in vLLM, and check that vLLM's greedy tokens are ours.

vLLM dropped first-generation Qwen after v0.23 (its registry lists ``QWenLMHeadModel`` as "supported
until v0.23.0" and refuses it), and even there it needed the official remote code for the config
(transformers has no ``model_type: "qwen"``) and for the tokenizer. Qwen-1, however, is Qwen2's
``Qwen2ForCausalLM`` without grouped-query attention once the tensors are renamed (see
``qwen/interop.py``): c_attn is Q|K|V stacked by rows, each with a bias; c_proj is o_proj (no bias);
``w2`` is the SiLU gate (gate_proj), ``w1`` the up projection, the MLP's c_proj is down_proj;
``intermediate_size`` in Qwen-1's config.json is twice the MLP width. So
:func:`write_vllm_checkpoint` writes a *copy* of a checkpoint in Qwen2 form, which every vLLM since
2024 (and transformers, SGLang, TGI) loads without remote code:

* weights renamed, c_attn split into q/k/v_proj; GPTQ checkpoints (the official AutoGPTQ layout that
  ``qwen quantize`` writes) are split the same way along the output dimension: ``qweight`` and
  ``scales`` by columns, ``qzeros`` by packed columns, ``g_idx`` copied, so no weight is requantized.
  The all-zero biases the GPTQ layout stores for bias-free layers are dropped (Qwen2 has none there).
* config.json with the Qwen2 field names, ``max_position_embeddings = seq_length`` (see below),
  ``quantization_config`` and quantize_config.json copied; generation_config.json with
  ``<|im_end|>`` added to the stop ids for ChatML models (the official chat stops on it).
* tokenizer.json, a Hugging Face "fast" tokenizer equal to ``qwen.tiktoken``: byte-level BPE with
  the same split regex (Qwen2's is the same), NFC normalisation, the 208 specials as added tokens,
  and merges derived from the ranks (every split of a token into two vocabulary pieces, ordered by
  the token's rank: that is tiktoken's merge order), with ``ignore_merges`` (tiktoken takes a piece
  that is itself a token whole). tokenizer_config.json carries a ChatML chat template with the
  official default system prompt.

What does not carry over: dynamic NTK and LogN attention (``use_dynamic_ntk``, ``use_logn_attn``),
which our engine and the official code switch on past ``seq_length`` tokens; vLLM's Qwen2 has
neither (its "dynamic" rope scaling is a different formula). Up to ``seq_length`` they are inactive,
so the copy computes the same function there, and the copy's context is capped at ``seq_length``
(``max_model_len`` opts into more, knowing the results then differ). Window attention
(``use_window_attn``) and ``rotary_pct < 1`` have no Qwen2 equivalent and are refused.

:func:`compare` runs our greedy decoding in this process and vLLM's in another interpreter (vLLM
pins its own torch/transformers, so it lives in its own virtual environment and our package is not
needed there): token ids go in and come out as JSON, with ``skip_tokenizer_init`` so the comparison
does not depend on the tokenizer. Where the two disagree, the report gives the first divergent step
and both engines' logit margins there, so a near-tie can be told from a bug.

    python -m qwen.bench.vllm_parity --model DIR [--vllm-python /path/to/vllm-venv/bin/python]
        [--prompts "text" ...] [--max-new-tokens 32] [--export-to DIR]

Setting up vLLM on a CPU machine: docs/scale-out.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

VLLM_PYTHON_ENV = "QWEN_VLLM_PYTHON"
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "你好，请介绍一下你自己。",
    "1, 2, 3, 5, 8,",
)
DEFAULT_SYSTEM = "You are a helpful assistant."
# ChatML as the official make_context writes it: turns "<|im_start|>role\ncontent<|im_end|>" joined
# by "\n", the official default system prompt when none is given, "<|im_start|>assistant\n" to reply.
CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class VLLMExportError(ValueError):
    """A checkpoint that cannot be written in a form vLLM runs as the same model (names the file/field)."""


# ------------------------------------------------------------------------------------------ weights
@dataclass
class _Piece:
    name: str
    cut: tuple[int, int, int] | None = None  # (dim, start, stop) of the source tensor, None = whole
    drop_if_zero: bool = False


def _qwen2_pieces(name: str, hidden: int, bits: int | None) -> list[_Piece] | None:
    """Where the source tensor ``name`` goes in the Qwen2 layout ([] = nowhere, None = unknown name)."""
    top = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}
    if name in top:
        return [_Piece(top[name])]
    if name.endswith("rotary_emb.inv_freq"):  # a buffer some exports keep; vLLM computes its own
        return []
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["transformer", "h"] or not parts[2].isdigit():
        return None
    prefix, module, leaf = f"model.layers.{parts[2]}.", ".".join(parts[3:-1]), parts[-1]
    if module in ("ln_1", "ln_2") and leaf == "weight":
        return [_Piece(prefix + ("input_layernorm" if module == "ln_1" else "post_attention_layernorm") + ".weight")]
    if module == "attn.c_attn":
        if leaf == "g_idx":  # one group index per input: the same for Q, K and V
            return [_Piece(f"{prefix}self_attn.{p}.g_idx") for p in ("q_proj", "k_proj", "v_proj")]
        if leaf in ("weight", "bias"):
            dim, width = 0, hidden  # [3H, H] rows / [3H]
        elif leaf in ("qweight", "scales"):
            dim, width = 1, hidden  # [K / per, 3H] / [G, 3H] columns
        elif leaf == "qzeros" and bits:
            dim, width = 1, hidden * bits // 32  # [G, 3H / per] packed columns
        else:
            return None
        return [_Piece(f"{prefix}self_attn.{p}.{leaf}", (dim, j * width, (j + 1) * width))
                for j, p in enumerate(("q_proj", "k_proj", "v_proj"))]
    target = {"attn.c_proj": "self_attn.o_proj", "mlp.w1": "mlp.up_proj", "mlp.w2": "mlp.gate_proj",
              "mlp.c_proj": "mlp.down_proj"}.get(module)
    if target is None or leaf not in ("weight", "bias", "qweight", "qzeros", "scales", "g_idx"):
        return None
    # Qwen2 has no bias on these layers; the GPTQ layout stores zeros for them, which we drop.
    return [_Piece(f"{prefix}{target}.{leaf}", drop_if_zero=leaf == "bias")]


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def _write_weights(src: str, stage: Path, hidden: int, bits: int | None, group_size: int | None,
                   max_shard_size: int | str, progress: bool) -> bool:
    """Stream the tensors of ``src`` into Qwen2-named safetensors shards in ``stage``.

    Returns whether every GPTQ ``g_idx`` is the plain ``k // group_size`` (no act-order permutation).
    """
    from safetensors.torch import save_file

    from ..checkpoint import find_weight_files, iter_checkpoint_tensors, progress_bar

    limit = _parse_size(max_shard_size)
    _, files = find_weight_files(src)
    total = sum(os.path.getsize(f) for f in files)
    bar = progress_bar(total, "vLLM copy", enabled=progress, unit="B", unit_scale=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, written, seen = 0, [], set()
    plain_g_idx = True

    def flush() -> None:
        name = f"model-{len(written) + 1:05d}.safetensors"
        save_file(shards[-1], str(stage / name), metadata={"format": "pt"})
        written.append(name)
        shards.append({})

    for file, name, reader in iter_checkpoint_tensors(src):
        pieces = _qwen2_pieces(name, hidden, bits)
        if pieces is None:
            raise VLLMExportError(f"{file}: tensor {name!r} has no place in the Qwen2 layout vLLM loads")
        t = reader.read(name)
        bar.update(t.numel() * t.element_size())
        if name.endswith(".g_idx") and group_size:
            g = t.numel() if group_size == -1 else group_size
            plain_g_idx = plain_g_idx and torch.equal(t.long(), torch.arange(t.numel()) // g)
        for piece in pieces:
            part = t if piece.cut is None else t.narrow(piece.cut[0], piece.cut[1], piece.cut[2] - piece.cut[1])
            if piece.drop_if_zero:
                if bool((part != 0).any()):
                    raise VLLMExportError(f"{file}: {name!r} is not zero, but Qwen2 (vLLM) has no bias on this layer")
                continue
            if piece.name in seen:
                raise VLLMExportError(f"{file}: tensor {name!r} appears twice")
            seen.add(piece.name)
            part = part.contiguous().clone()  # its own storage: safetensors refuses shared or strided views
            nbytes = part.numel() * part.element_size()
            if shards[-1] and size + nbytes > limit:
                flush()
                size = 0
            shards[-1][piece.name] = part
            size += nbytes
    bar.close()
    if shards[-1] or not written:
        flush()
    if len(written) == 1:
        os.replace(stage / written[0], stage / "model.safetensors")
        return plain_g_idx
    # Shard names must say "of N", known only now.
    final = []
    index: dict[str, Any] = {"metadata": {"total_size": 0}, "weight_map": {}}
    for i, name in enumerate(written):
        new = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(stage / name, stage / new)
        final.append(new)
    from ..checkpoint import SafetensorsReader

    for name in final:
        with SafetensorsReader(stage / name) as r:
            for key in r.keys():
                index["weight_map"][key] = name
                dtype, shape, begin, end = r.entries[key]
                index["metadata"]["total_size"] += end - begin
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return plain_g_idx


# ------------------------------------------------------------------------------------------ tokenizer
def _byte_to_char() -> list[str]:
    """GPT-2's printable spelling of each byte (what byte-level BPE tokenizers store in their vocab).

    Bytes that print as themselves in Latin-1 keep their character; the remaining 68 (space, controls,
    DEL..NBSP, soft hyphen) take U+0100, U+0101, ... in byte order.
    """
    keeps = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    spelled, extra = {b: chr(b) for b in keeps}, 0
    for b in range(256):
        if b not in spelled:
            spelled[b] = chr(0x100 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    """A Hugging Face ``tokenizers`` definition (tokenizer.json) that encodes exactly as ``tokenizer``."""
    from ..tokenizer import PAT_STR

    chars = _byte_to_char()

    def spell(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    ranks: dict[bytes, int] = tokenizer.mergeable_ranks
    vocab = {spell(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, int, str]] = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = ranks.get(tok[:i]), ranks.get(tok[i:])
            if left is not None and right is not None and left < rank and right < rank:
                merges.append((rank, left, f"{spell(tok[:i])} {spell(tok[i:])}"))
    merges.sort()
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True}
            for text, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated", "invert": False}, byte_level]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": [m for _, _, m in merges]},
    }


def write_tokenizer_files(tokenizer: Any, directory: str | os.PathLike) -> None:
    """tokenizer.json + tokenizer_config.json (with the ChatML chat template) for transformers/vLLM."""
    directory = Path(directory)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokenizer), ensure_ascii=False), "utf-8")
    eod = "<|endoftext|>"
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1000000000000000019884624838656,  # HF's "no limit" (int(1e30))
        "bos_token": None, "eos_token": eod, "pad_token": eod, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "errors": "replace", "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")


# ------------------------------------------------------------------------------------------ checkpoint
def _qwen2_config(config: Any, gptq: dict[str, Any] | None, max_model_len: int, dtype: str) -> dict[str, Any]:
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,  # Qwen-1's field is twice the MLP width
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,
        "hidden_act": "silu",
        "rms_norm_eps": config.layer_norm_epsilon,
        "rope_theta": float(config.rotary_emb_base),
        "max_position_embeddings": max_model_len,
        "tie_word_embeddings": config.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": config.num_hidden_layers,
        "attention_dropout": 0.0,
        "initializer_range": config.initializer_range,
        "use_cache": True,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": dtype,
        # For people reading the file: what the Qwen-1 original had that this layout cannot express.
        "qwen1_source": {"seq_length": config.seq_length, "max_position_embeddings": config.max_position_embeddings,
                         "use_dynamic_ntk": config.use_dynamic_ntk, "use_logn_attn": config.use_logn_attn},
    }
    if gptq is not None:
        cfg["quantization_config"] = gptq
    return cfg


def _generation_config(src: str) -> dict[str, Any]:
    path = os.path.join(src, "generation_config.json")
    gen: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            gen = json.load(f)
    eos = gen.get("eos_token_id", 151643)
    eos = list(eos) if isinstance(eos, list) else [eos]
    if gen.get("chat_format", "chatml") == "chatml" and 151645 not in eos:
        eos.append(151645)  # the official chat() stops at <|im_end|> through stop_words_ids
    # vLLM reads these as the default sampling parameters (--generation-config auto).
    keep = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "pad_token_id")
    out = {k: gen[k] for k in keep if k in gen}
    out.update(eos_token_id=eos, bos_token_id=151643)
    return out


def vllm_limits(config: dict[str, Any]) -> list[str]:
    """What vLLM 0.32 is known to refuse or ignore in the copy whose config.json is ``config`` (read from its
    source: quantization/auto_gptq.py, gptq_utils.py, kernels/linear/mixed_precision/cpu.py, models/qwen2.py)."""
    notes = []
    src = config.get("qwen1_source", {})
    if config["max_position_embeddings"] > src.get("seq_length", config["max_position_embeddings"]) and (
            src.get("use_dynamic_ntk") or src.get("use_logn_attn")):
        notes.append(f"context {config['max_position_embeddings']} > seq_length {src['seq_length']}: past it the "
                     "original uses dynamic NTK/LogN and vLLM does not, so results differ there")
    q = config.get("quantization_config")
    if q:
        if (q["bits"], q.get("sym", True)) not in ((4, True), (8, True)):
            notes.append(f"GPTQ bits={q['bits']} sym={q.get('sym', True)}: vLLM runs only symmetric 4- and 8-bit")
        if q.get("desc_act") and q.get("group_size", -1) != -1:
            notes.append("GPTQ desc_act=True with a permuted g_idx: vLLM refuses act-order checkpoints (quantize "
                         "with --static-groups, or without --desc-act)")
        if q["bits"] == 8:
            notes.append("8-bit GPTQ: vLLM's CPU kernel is 4-bit only; a GPU (Marlin kernels) runs it")
    return notes


def write_vllm_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, max_model_len: int | None = None,
                          tokenizer: bool = True, max_shard_size: int | str = "4GB", progress: bool = True
                          ) -> dict[str, Any]:
    """Write a copy of the checkpoint ``src`` that vLLM loads as Qwen2ForCausalLM; returns its config.json.

    ``max_model_len`` (default ``seq_length``): the copy's ``max_position_embeddings``. Beyond
    ``seq_length`` the original uses dynamic NTK and LogN, which vLLM does not, so a longer context
    runs but is no longer the same model. ``dst`` is replaced atomically (written next to it first).
    """
    from ..config import QWenConfig
    from ..hub import resolve_model_path

    src = resolve_model_path(str(src))
    config = QWenConfig.from_pretrained(src)
    where = os.path.join(src, "config.json")
    if config.rotary_pct != 1.0:
        raise VLLMExportError(f"{where}: rotary_pct={config.rotary_pct}: vLLM's Qwen2 rotates every channel (1.0)")
    if getattr(config, "use_window_attn", False):
        raise VLLMExportError(f"{where}: use_window_attn has no equivalent in vLLM's Qwen2 (its sliding window is "
                              "another scheme); write the copy from a config without it")
    gptq, bits, group_size = None, None, None
    if config.quantization_config is not None or os.path.exists(os.path.join(src, "quantize_config.json")):
        from ..quant.layout import load_quant_config

        qcfg = load_quant_config(src, config.quantization_config)
        bits, group_size = qcfg.bits, qcfg.group_size
        gptq = dict(config.quantization_config or {})
        gptq.update(quant_method="gptq", bits=qcfg.bits, group_size=qcfg.group_size, desc_act=qcfg.desc_act,
                    sym=qcfg.sym)
        for key in ("modules_in_block_to_quantize", "dynamic"):
            if gptq.get(key):  # these name Qwen-1 modules; vLLM would match them against Qwen2 names
                raise VLLMExportError(f"{where}: quantization_config.{key} is not supported by the vLLM copy")
    limit = max_model_len or config.seq_length
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        plain_g_idx = _write_weights(src, stage, config.hidden_size, bits, group_size, max_shard_size, progress)
        if gptq is not None and gptq["desc_act"] and plain_g_idx:
            # act-order with static groups (or one group per row) leaves g_idx = k // group_size: the tensors
            # are then in the plain layout, which is what desc_act=False tells vLLM (it refuses desc_act=True).
            gptq["desc_act"] = False
        from ..checkpoint import SafetensorsReader

        first = next(p for p in sorted(stage.iterdir()) if p.suffix == ".safetensors")
        with SafetensorsReader(first) as r:
            floats = [r.dtype(k) for k in r.keys() if r.dtype(k).is_floating_point]
        dtype = str(floats[0] if floats else torch.float16).removeprefix("torch.")
        cfg = _qwen2_config(config, gptq, limit, dtype)
        (stage / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (stage / "generation_config.json").write_text(json.dumps(_generation_config(src), indent=2) + "\n")
        if gptq is not None:  # AutoGPTQ's own file, for loaders that read it instead of config.json
            quantize_config = {k: v for k, v in gptq.items() if k != "quant_method"}
            (stage / "quantize_config.json").write_text(json.dumps(quantize_config, indent=2) + "\n")
        if tokenizer:
            from ..tokenizer import QWenTokenizer

            tok = QWenTokenizer.from_pretrained(src) if os.path.exists(os.path.join(src, "qwen.tiktoken")) \
                else QWenTokenizer()
            if max(tok.special_tokens.values()) < config.vocab_size:  # else ids would index past the embedding
                write_tokenizer_files(tok, stage)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}-old-", dir=dst.parent))
            os.replace(dst, old / dst.name)
            os.replace(stage, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, dst)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return cfg


# ------------------------------------------------------------------------------------------ vLLM side
# Runs in vLLM's interpreter: nothing of ours is imported there. argv: job.json result.json.
DRIVER = r'''
import json, os, sys, time

def main():
    with open(sys.argv[1]) as f:
        job = json.load(f)
    import vllm
    from vllm import LLM, SamplingParams
    t0 = time.time()
    llm = LLM(model=job["model"], dtype=job["dtype"], enforce_eager=True, max_model_len=job["max_model_len"],
              skip_tokenizer_init=True, seed=0, **job["engine_args"])
    t1 = time.time()
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], ignore_eos=True,
                            logprobs=job["logprobs"], detokenize=False, repetition_penalty=1.0)
    outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
    results = []
    for out in outs:
        c = out.outputs[0]
        top = [sorted(([int(t), float(lp.logprob)] for t, lp in step.items()), key=lambda x: -x[1])
               for step in (c.logprobs or [])]
        results.append({"tokens": [int(t) for t in c.token_ids], "top": top})
    tmp = sys.argv[2] + ".tmp"
    with open(tmp, "w") as f:
        quantization = llm.llm_engine.vllm_config.model_config.quantization
        json.dump({"results": results, "load_s": t1 - t0, "generate_s": time.time() - t1,
                   "vllm_version": vllm.__version__, "quantization": quantization}, f)
    os.replace(tmp, sys.argv[2])

if __name__ == "__main__":  # vLLM starts worker processes that re-import the main module
    main()
'''


class VLLMRunError(RuntimeError):
    """vLLM failed to load or run the model; the message ends with the tail of its log."""


def default_vllm_python() -> str:
    return os.environ.get(VLLM_PYTHON_ENV) or sys.executable


def vllm_greedy(model_dir: str | os.PathLike, prompts: list[list[int]], max_new_tokens: int, *,
                vllm_python: str | None = None, dtype: str = "float32", max_model_len: int | None = None,
                logprobs: int = 5, engine_args: dict[str, Any] | None = None, timeout: float = 900,
                log_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """vLLM's greedy continuations of token-id ``prompts`` (run by ``vllm_python`` in a child process).

    Returns {"results": [{"tokens": [...], "top": [[[id, logprob], ...] per step]}], "load_s", "generate_s",
    "vllm_version", "quantization"}.
    """
    python = vllm_python or default_vllm_python()
    need = max(len(p) for p in prompts) + max_new_tokens
    job = {"model": str(model_dir), "prompts": prompts, "max_new_tokens": max_new_tokens, "dtype": dtype,
           "max_model_len": max_model_len or need, "logprobs": logprobs, "engine_args": engine_args or {}}
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU (the default, 4+, is far more than needed)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for var in ("PYTHONPATH", "VIRTUAL_ENV"):  # our environment must not leak into vLLM's
        env.pop(var, None)
    with tempfile.TemporaryDirectory(prefix="qwen-vllm-") as work:
        driver, job_file, result = (os.path.join(work, n) for n in ("driver.py", "job.json", "result.json"))
        Path(driver).write_text(DRIVER)
        Path(job_file).write_text(json.dumps(job))
        log_path = str(log_file) if log_file else os.path.join(work, "vllm.log")
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run([python, driver, job_file, result], cwd=work, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, timeout=timeout)
            except FileNotFoundError:
                raise VLLMRunError(f"{python}: no such interpreter (set --vllm-python or ${VLLM_PYTHON_ENV}; "
                                   "docs/scale-out.md shows how to make a vLLM virtual environment)") from None
            except subprocess.TimeoutExpired:
                proc = None
        if proc is None or proc.returncode != 0 or not os.path.exists(result):
            lines = Path(log_path).read_text(errors="replace").splitlines()
            # The root cause is usually raised in a worker process, far above the last lines.
            causes = [line for line in lines if re.search(r"\b\w*(Error|Exception): ", line)]
            why = "timed out" if proc is None else f"exited with status {proc.returncode}"
            raise VLLMRunError(f"vLLM ({python}) {why} on {model_dir}"
                               + (f"; first error: {causes[0].strip()}" if causes else "")
                               + f"\nlast lines of its log ({log_path if log_file else 'not kept: use --log'}):\n"
                               + "\n".join(lines[-15:]))
        with open(result) as f:
            return json.load(f)


# ------------------------------------------------------------------------------------------ our side
def our_greedy(model: Any, prompts: list[list[int]], max_new_tokens: int) -> list[dict[str, Any]]:
    """Our greedy continuations, and per new token the logits [N, V] it was chosen from."""
    from ..generate import generate_step
    from ..sampling import SamplingParams

    out = []
    for ids in prompts:
        tokens, logits = [], []
        for step in generate_step(model, torch.tensor([ids]), max_new_tokens=max_new_tokens, params=SamplingParams(),
                                  eos_token_id=[], stop_words_ids=[]):
            tokens.append(int(step.tokens[0]))
            logits.append(step.scores[0].float())
        out.append({"tokens": tokens, "logits": torch.stack(logits)})
    return out


@dataclass
class PromptResult:
    prompt: str
    prompt_tokens: int
    ours: list[int]
    theirs: list[int]
    matched: int  # leading tokens that agree
    min_margin: float  # smallest top-1 minus top-2 logit of ours over the agreeing steps
    our_gap: float | None = None  # at the first divergence: our logit of our token minus of vLLM's
    their_gap: float | None = None  # vLLM's logprob of its token minus of ours (None: ours not in its top-k)
    distinct: int = 0
    # Over the agreeing steps (and the first divergent one): the largest |our log-probability - vLLM's| of
    # vLLM's two most likely tokens (the ones greedy decoding chooses between).
    max_logprob_diff: float = float("nan")
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.ours == self.theirs


def compare_tokens(prompt: str, prompt_len: int, ours: dict[str, Any], theirs: dict[str, Any]) -> PromptResult:
    a, b = ours["tokens"], theirs["tokens"]
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    logits = ours["logits"]
    top2 = logits[:k].topk(2, dim=-1).values if k else None
    margin = float((top2[:, 0] - top2[:, 1]).min()) if top2 is not None else float("nan")
    res = PromptResult(prompt, prompt_len, a, b, k, margin, distinct=len(set(a)))
    logp = torch.log_softmax(logits, dim=-1)
    diffs = [abs(float(logp[s, t]) - lp) for s, step in enumerate(theirs.get("top", [])[: k + 1]) if s < len(logp)
             for t, lp in step[:2]]
    if diffs:
        res.max_logprob_diff = max(diffs)
    if k < min(len(a), len(b)):
        res.our_gap = float(logits[k, a[k]] - logits[k, b[k]])
        step = {t: lp for t, lp in theirs["top"][k]} if k < len(theirs.get("top", [])) else {}
        if a[k] in step and b[k] in step:
            res.their_gap = step[b[k]] - step[a[k]]
    elif len(a) != len(b):
        res.notes.append(f"lengths differ: ours {len(a)}, vLLM {len(b)}")
    return res


def format_table(results: list[PromptResult]) -> str:
    rows = [("#", "prompt", "len", "match", "distinct", "min margin", "max |dlogp|", "first diff (ours/vLLM)",
             "gap ours", "gap vLLM")]
    for i, r in enumerate(results):
        diff = "-" if r.ok else (f"step {r.matched}: {r.ours[r.matched]}/{r.theirs[r.matched]}"
                                 if r.matched < min(len(r.ours), len(r.theirs)) else "; ".join(r.notes))
        text = r.prompt if len(r.prompt) <= 24 else r.prompt[:23] + "…"
        text = text.encode("ascii", "backslashreplace").decode()  # keeps the columns aligned
        rows.append((str(i), repr(text), str(r.prompt_tokens), f"{r.matched}/{len(r.ours)}", str(r.distinct),
                     f"{r.min_margin:.4g}", f"{r.max_logprob_diff:.2g}", diff,
                     "-" if r.our_gap is None else f"{r.our_gap:.3g}",
                     "-" if r.their_gap is None else f"{r.their_gap:.3g}"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def compare(model_dir: str | os.PathLike, prompts: list[str] | None = None, max_new_tokens: int = 32, *,
            vllm_python: str | None = None, dtype: str | None = None, export_to: str | os.PathLike | None = None,
            max_model_len: int | None = None, engine_args: dict[str, Any] | None = None,
            log_file: str | os.PathLike | None = None, progress: bool = False, our_kernel: str = "dequant"
            ) -> dict[str, Any]:
    """Greedy tokens of our engine and of vLLM on the checkpoint ``model_dir`` (written as a vLLM copy first).

    ``dtype`` is vLLM's activation dtype: float32 by default, float16 for GPTQ checkpoints (vLLM runs GPTQ
    only in float16/bfloat16; float16 has 3 more mantissa bits, so fewer near-ties flip). ``our_kernel``: the
    ``quant_kernel`` our GPTQ model runs with (default the exact "dequant" reference).
    Returns {"results": [PromptResult], "vllm": the driver's output, "notes": vllm_limits(...), timings}.
    """
    from ..auto import AutoModelForCausalLM, AutoTokenizer
    from ..config import QWenConfig

    model_dir = str(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = list(prompts or DEFAULT_PROMPTS)
    ids = [tok.encode(t) for t in texts]
    quantized = QWenConfig.from_pretrained(model_dir).quantization_config is not None
    # GPTQ: our reference is the exact function the checkpoint encodes (dequantized weights in float32), so
    # that every difference is vLLM's; our fast kernels round activations themselves (qwen/quant/linear.py).
    options = {"quant_kernel": our_kernel} if quantized else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, progress=False, **options).eval()
    dtype = dtype or ("float16" if quantized else "float32")
    with tempfile.TemporaryDirectory(prefix="qwen-vllm-copy-") as tmp:
        copy = Path(export_to) if export_to else Path(tmp) / "model"
        t0 = time.time()
        cfg = write_vllm_checkpoint(model_dir, copy, max_model_len=max_model_len, progress=progress)
        notes = vllm_limits(cfg)
        copy_s = time.time() - t0
        t0 = time.time()
        ours = our_greedy(model, ids, max_new_tokens)
        ours_s = time.time() - t0
        try:
            theirs = vllm_greedy(copy, ids, max_new_tokens, vllm_python=vllm_python, dtype=dtype,
                                 max_model_len=max_model_len, engine_args=engine_args, log_file=log_file)
        except VLLMRunError as e:
            if notes:
                raise VLLMRunError(f"{e}\nknown vLLM limits that apply: " + "; ".join(notes)) from None
            raise
    results = [compare_tokens(t, len(p), o, v) for t, p, o, v in zip(texts, ids, ours, theirs["results"])]
    return {"results": results, "vllm": theirs, "copy_s": copy_s, "ours_s": ours_s, "dtype": dtype,
            "quantized": quantized, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen.bench.vllm_parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", required=True, metavar="DIR", help="our checkpoint (float or GPTQ)")
    parser.add_argument("--vllm-python", default=None, metavar="PATH",
                        help=f"python of the vLLM environment (default ${VLLM_PYTHON_ENV}, else this python)")
    parser.add_argument("--prompts", nargs="+", default=None, help="prompt texts (default: four mixed prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="vLLM's dtype (default float32; float16 for GPTQ, which vLLM runs only in 16 bits)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context of the vLLM copy (default: seq_length; longer is no longer the same model)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="vLLM tensor parallelism (on a CPU: N processes, each with its share of the cores)")
    parser.add_argument("--export-to", default=None, metavar="DIR",
                        help="keep the vLLM copy of the checkpoint here (to `vllm serve` it afterwards)")
    parser.add_argument("--export-only", action="store_true", help="only write --export-to, compare nothing")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--log", default=None, metavar="FILE", help="keep vLLM's log here")
    args = parser.parse_args(argv)

    try:
        if args.export_only:
            if not args.export_to:
                parser.error("--export-only needs --export-to DIR")
            cfg = write_vllm_checkpoint(args.model, args.export_to, max_model_len=args.max_model_len)
            print(f"wrote {args.export_to} (Qwen2ForCausalLM, max_position_embeddings "
                  f"{cfg['max_position_embeddings']}{', GPTQ' if 'quantization_config' in cfg else ''})")
            for note in vllm_limits(cfg):
                print(f"note: {note}", file=sys.stderr)
            return 0
        out = compare(args.model, args.prompts, args.max_new_tokens, vllm_python=args.vllm_python, dtype=args.dtype,
                      export_to=args.export_to, max_model_len=args.max_model_len, log_file=args.log, progress=True,
                      engine_args={"tensor_parallel_size": args.tensor_parallel_size}
                      if args.tensor_parallel_size != 1 else None)
    except (VLLMExportError, VLLMRunError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    results, info = out["results"], out["vllm"]
    for note in out["notes"]:
        print(f"note: {note}")
    quant = f", {info['quantization']}" if info["quantization"] else ""
    print(f"vLLM {info['vllm_version']} ({out['dtype']}{quant}):"
          f" load {info['load_s']:.1f} s, generate {info['generate_s']:.2f} s; ours {out['ours_s']:.2f} s;"
          f" copy written in {out['copy_s']:.1f} s")
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    print(f"{len(results) - len(bad)}/{len(results)} prompts: identical greedy tokens")
    if args.json:
        def plain(v: Any) -> Any:
            return None if isinstance(v, float) and v != v else v  # NaN is not JSON

        payload = {"model": args.model, "dtype": out["dtype"], "vllm_version": info["vllm_version"],
                   "notes": out["notes"], "results": [{k: plain(v) for k, v in r.__dict__.items()} for r in results]}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, ensure_ascii=False)
        os.replace(tmp, args.json)
    return 0 if not bad else 2


if __name__ == "__main__":
    raise SystemExit(main())
