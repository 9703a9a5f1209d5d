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
