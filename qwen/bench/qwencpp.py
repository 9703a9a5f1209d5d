"""qwen.cpp as a benchmark peer: write our weights in its GGML file format and time its decoder.

qwen.cpp (li-plus/QwenLM, archived) runs Qwen-1 tensors under their official names. Its file is:
the magic ``ggml``; 12 int32 header values (tensor type, vocab, hidden, heads, heads, layers,
intermediate_size as in config.json, seq_length, eos, pad, im_start, im_end); then per tensor an
int32 name length, the name, int32 ndim, the shape, the int32 type, and the data at a 16-byte aligned
offset. 1-D tensors are always f32. We write f32, f16, and the block formats q8_0 and q4_0 (every
2-D tensor quantized, as qwen.cpp's own converter does):

- q8_0: blocks of 32 weights along a row: an fp16 scale d = max|w| / 127, then 32 int8 round(w / d).
- q4_0: blocks of 32: an fp16 scale d = m / -8 where m is the weight of largest magnitude (sign kept),
  then 16 bytes; byte j holds min(15, int(w_j / d + 8.5)) in its low nibble and the same for w_{j+16}
  in its high nibble (ggml's layout since May 2023, which qwen.cpp 0.1.3 uses); w = d * (q - 8).

Install (environment.md §5; about 2 minutes to build):
    CMAKE_POLICY_VERSION_MINIMUM=3.5 CMAKE_ARGS="-DCMAKE_POSITION_INDEPENDENT_CODE=ON" \\
        CMAKE_BUILD_PARALLEL_LEVEL=2 pip install qwen-cpp==0.1.3
"""

from __future__ import annotations

import os
import struct
from typing import Any, BinaryIO

import torch

GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "q4_0": 18 / 32, "q8_0": 34 / 32}
ENGINE_KINDS = {"qwen.cpp": "f32", "qwen.cpp-q8_0": "q8_0", "qwen.cpp-q4_0": "q4_0"}  # `qwen bench` engine -> type
QK = 32  # weights per q4_0 / q8_0 block
ALIGN = 16


def available() -> bool:
    try:
        import qwen_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _tensor_names(num_layers: int) -> list[str]:
    names = ["transformer.wte.weight"]
    for i in range(num_layers):
        p = f"transformer.h.{i}."
        names += [p + "ln_1.weight", p + "attn.c_attn.weight", p + "attn.c_attn.bias", p + "attn.c_proj.weight",
                  p + "ln_2.weight", p + "mlp.w1.weight", p + "mlp.w2.weight", p + "mlp.c_proj.weight"]
    return names + ["transformer.ln_f.weight", "lm_head.weight"]


def _write_tensor(f: BinaryIO, name: str, t: torch.Tensor, kind: str) -> None:
    kind = kind if t.dim() == 2 else "f32"
    encoded = name.encode()
    f.write(struct.pack("<i", len(encoded)) + encoded)
    f.write(struct.pack(f"<{2 + t.dim()}i", t.dim(), *t.shape, GGML_TYPES[kind]))
    f.seek((f.tell() + ALIGN - 1) // ALIGN * ALIGN)
    if kind == "q8_0":
        f.write(quantize_q8_0(t))
    elif kind == "q4_0":
        f.write(quantize_q4_0(t))
    else:
        data = t.detach().to(torch.float16 if kind == "f16" else torch.float32).contiguous()
        f.write(data.numpy().tobytes())


def _blocks(t: torch.Tensor) -> torch.Tensor:
    if t.shape[-1] % QK:
        raise ValueError(f"rows of {t.shape[-1]} values do not split into blocks of {QK}")
    return t.detach().float().reshape(-1, QK)


def quantize_q8_0(t: torch.Tensor) -> bytes:
    """ggml's q8_0 encoding of a 2-D tensor (rows split into blocks of 32)."""
    blocks = _blocks(t)
    d = blocks.abs().amax(dim=1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv[:, None]).clamp(-127, 127).to(torch.int8)
    out = torch.empty(blocks.shape[0], 2 + QK, dtype=torch.uint8)
    out[:, :2] = d.half().view(torch.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(torch.uint8)
    return out.numpy().tobytes()


def quantize_q4_0(t: torch.Tensor) -> bytes:
    """ggml's q4_0 encoding of a 2-D tensor (rows split into blocks of 32)."""
    blocks = _blocks(t)
    idx = blocks.abs().argmax(dim=1, keepdim=True)
    m = blocks.gather(1, idx).squeeze(1)
    d = m / -8
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = (blocks * inv[:, None] + 8.5).to(torch.int32).clamp(0, 15).to(torch.uint8)  # truncation, as ggml
    out = torch.empty(blocks.shape[0], 2 + QK // 2, dtype=torch.uint8)
    out[:, :2] = d.half().view(torch.uint8).reshape(-1, 2)
    out[:, 2:] = q[:, : QK // 2] | (q[:, QK // 2 :] << 4)
    return out.numpy().tobytes()


def write_ggml(model: Any, path: str | os.PathLike, kind: str = "f32", eos: int = 151643, pad: int = 151643,
               im_start: int = 151644, im_end: int = 151645) -> None:
    """Write ``model`` (a QWenLMHeadModel) as a qwen.cpp GGML file."""
    if kind not in GGML_TYPES:
        raise ValueError(f"unsupported GGML type {kind!r}; choose from {sorted(GGML_TYPES)}")
    cfg = model.config
    state = model.state_dict()
    if "lm_head.weight" not in state:  # tied embeddings: qwen.cpp wants its own head
        state["lm_head.weight"] = state["transformer.wte.weight"]
    header = [GGML_TYPES[kind], cfg.vocab_size, cfg.hidden_size, cfg.num_attention_heads, cfg.num_attention_heads,
              cfg.num_hidden_layers, cfg.intermediate_size, cfg.seq_length, eos, pad, im_start, im_end]
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(b"ggml" + struct.pack(f"<{len(header)}i", *header))
        for name in _tensor_names(cfg.num_hidden_layers):
            _write_tensor(f, name, state[name], kind)
    os.replace(tmp, path)


def run_worker(args: Any) -> dict[str, Any]:
    """The ``qwen.cpp`` engine of ``qwen bench``: same seeded weights, same prompts, greedy, timed like ours."""
    import json
    import resource
    import subprocess
    import sys
    import tempfile
    import time

    import qwen_cpp

    from ..config import preset_config
    from ..tokenizer import bundled_vocab_path
    from .common import measure

    if args.dtype != "float32":
        raise ValueError("the qwen.cpp comparison starts from float32 weights (GGML f32, q8_0, q4_0)")
    kind = ENGINE_KINDS[args.engine]
    config = preset_config(args.preset, **json.loads(args.overrides))
    workdir = tempfile.mkdtemp(prefix="qwen-ggml-")
    path = os.path.join(workdir, "model.bin")
    # Write the file from a separate process so this worker's peak RSS is qwen.cpp's alone.
    subprocess.run([sys.executable, "-m", "qwen.bench.qwencpp", path, args.preset, str(args.seed), args.overrides,
                    kind], check=True)
    try:
        pipe = qwen_cpp.Pipeline(path, str(bundled_vocab_path()))

        def run(prompt: torch.Tensor, n: int) -> tuple[float, list[float]]:
            """(seconds to the first new token, [seconds between new tokens]) for one greedy generation."""
            ids = prompt[0].tolist()
            cfg = qwen_cpp._C.GenerationConfig(max_length=len(ids) + n + 1, max_context_length=len(ids) + n + 1,
                                               do_sample=False, num_threads=args.threads)
            n_past, n_ctx = 0, len(ids)
            t0 = time.perf_counter()
            times = []
            for _ in range(n):
                tok = pipe.model.generate_next_token(ids, cfg, n_past, n_ctx)
                times.append(time.perf_counter())
                n_past = len(ids)
                ids.append(tok)
            return times[0] - t0, [b - a for a, b in zip(times, times[1:])]

        # Every 2-D tensor but the embedding (a row gather) is read once per token, at the file's type.
        table = config.vocab_size * config.hidden_size
        # num_parameters counts a tied table once; qwen.cpp's file has its own head either way.
        matrices = config.num_parameters() - table + (table if config.tie_word_embeddings else 0)
        norms_and_biases = config.num_hidden_layers * (2 * config.hidden_size + 3 * config.hidden_size) + config.hidden_size
        weights = int((matrices - norms_and_biases) * BYTES_PER_WEIGHT[kind] + norms_and_biases * 4)
        results = measure(run, config, 4, args, weights)
    finally:
        os.unlink(path)
        os.rmdir(workdir)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"engine": args.engine, "preset": args.preset, "dtype": args.dtype, "threads": args.threads,
            "parameters": config.num_parameters(), "weight_bytes_per_token": weights,
            "peak_rss_bytes": peak, "results": results}


if __name__ == "__main__":  # python -m qwen.bench.qwencpp OUT PRESET SEED OVERRIDES_JSON [KIND]
    import json
    import sys

    from .common import build_model

    out, preset, seed, overrides = sys.argv[1:5]
    write_ggml(build_model(preset, int(seed), "float32", json.loads(overrides)), out,
               kind=sys.argv[5] if len(sys.argv) > 5 else "f32")
