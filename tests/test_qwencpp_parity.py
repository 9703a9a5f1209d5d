"""Independent check against qwen.cpp (a C++ Qwen-1 implementation), when it is installed: on the same weights,
written by our GGML writer, its greedy tokens equal ours. Skipped otherwise (it needs a 2-minute native build;
see qwen/bench/qwencpp.py)."""

from __future__ import annotations

import pytest
import torch

qwen_cpp = pytest.importorskip("qwen_cpp")

from qwen.bench.core import build_model  # noqa: E402
from qwen.bench.qwencpp import write_ggml  # noqa: E402
from qwen.generate import generate  # noqa: E402
from qwen.tokenizer import bundled_vocab_path  # noqa: E402


@pytest.mark.parametrize("overrides", [{}, {"hidden_size": 256, "num_attention_heads": 2, "kv_channels": 128}])
def test_greedy_tokens_equal_qwen_cpp(tmp_path, overrides):
    model = build_model("tiny", 0, "float32", overrides)
    path = tmp_path / "model.bin"
    write_ggml(model, path)
    pipe = qwen_cpp.Pipeline(str(path), str(bundled_vocab_path()))
    ids = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(3))
    ours = generate(model, ids, max_new_tokens=16, do_sample=False, eos_token_id=[])[0, 20:].tolist()
    cfg = qwen_cpp._C.GenerationConfig(max_length=64, max_context_length=64, do_sample=False, num_threads=1)
    seq, n_past, theirs = ids[0].tolist(), 0, []
    for _ in range(16):
        tok = pipe.model.generate_next_token(seq, cfg, n_past, len(ids[0]))
        n_past = len(seq)
        seq.append(tok)
        theirs.append(tok)
    assert ours == theirs


def _dequantize_ggml(data: bytes, shape: tuple[int, int], kind: str) -> torch.Tensor:
    """An independent reading of ggml's q8_0 / q4_0 blocks (ggml.c's dequantize_row_*)."""
    import numpy as np

    if kind == "q8_0":
        blocks = np.frombuffer(data, dtype=np.dtype([("d", "<f2"), ("q", "i1", 32)]))
        values = blocks["d"].astype(np.float32)[:, None] * blocks["q"].astype(np.float32)
    else:
        blocks = np.frombuffer(data, dtype=np.dtype([("d", "<f2"), ("q", "u1", 16)]))
        low = (blocks["q"] & 0x0F).astype(np.float32) - 8
        high = (blocks["q"] >> 4).astype(np.float32) - 8
        values = blocks["d"].astype(np.float32)[:, None] * np.concatenate([low, high], axis=1)
    return torch.from_numpy(values.reshape(shape).copy())


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_ggml_files_run_in_qwen_cpp_like_their_dequantized_weights(tmp_path, kind):
    from qwen.bench.qwencpp import quantize_q4_0, quantize_q8_0

    model = build_model("tiny", 0, "float32", {"hidden_size": 256, "num_attention_heads": 2, "kv_channels": 128})
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked logits: greedy choices robust to 8-bit activation rounding
        # Our model gets the weights qwen.cpp will see: each 2-D tensor through the block format and back.
        quantize = quantize_q8_0 if kind == "q8_0" else quantize_q4_0
        for name, p in model.named_parameters():
            if p.dim() == 2:  # the embedding too: the writer quantizes every matrix
                back = _dequantize_ggml(quantize(p), tuple(p.shape), kind)
                step = p.abs().amax() / (127 if kind == "q8_0" else 7)
                assert float((back - p).abs().max()) <= float(step)  # the format's own rounding bound
                p.copy_(back)
    path = tmp_path / "model.bin"
    write_ggml(model, path, kind=kind)
    pipe = qwen_cpp.Pipeline(str(path), str(bundled_vocab_path()))
    ids = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(3))
    ours = generate(model, ids, max_new_tokens=8, do_sample=False, eos_token_id=[])[0, 20:].tolist()
    cfg = qwen_cpp._C.GenerationConfig(max_length=64, max_context_length=64, do_sample=False, num_threads=1)
    seq, n_past, theirs = ids[0].tolist(), 0, []
    for _ in range(8):
        tok = pipe.model.generate_next_token(seq, cfg, n_past, len(ids[0]))
        n_past = len(seq)
        seq.append(tok)
        theirs.append(tok)
    # qwen.cpp also rounds activations to 8 bits in these matmuls, so equality is expected only while no
    # choice is close; with peaked logits all 8 agree here.
    assert ours == theirs
