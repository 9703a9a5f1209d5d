"""oneDNN-packed linear layers: same results (to fp32 rounding), same state dict, reversible."""

from __future__ import annotations

import pytest
import torch

from qwen.config import preset_config
from qwen import kernels
from qwen.cpu_pack import MKL_MIN_ROWS, PackedLinear, is_packed, pack_linear_layers, packing_supported, unpack_linear_layers
from qwen.generate import generate
from qwen.model import QWenLMHeadModel

pytestmark = pytest.mark.skipif(not packing_supported(), reason="PyTorch built without oneDNN")


def make(tied: bool = False) -> QWenLMHeadModel:
    model = QWenLMHeadModel(preset_config("tiny-vocab", tie_word_embeddings=tied))
    model.init_weights(seed=0)
    return model.eval()


def test_packed_linear_matches_dense_and_unpacks_exactly():
    lin = torch.nn.Linear(96, 40, bias=True)
    packed = PackedLinear(lin)
    x = torch.randn(3, 5, 96)
    with torch.no_grad():
        # Different accumulation order only: fp32 rounding (relative 1e-6).
        assert torch.allclose(packed(x), lin(x), rtol=1e-5, atol=1e-5)
    # every path of the forward: the gemv kernel (a few rows), oneDNN (prompts), MKL (long prompts)
    for rows in (1, kernels.MAX_ROWS + 1, MKL_MIN_ROWS + 3):
        x = torch.randn(1, rows, 96)
        with torch.no_grad():
            assert torch.allclose(packed(x), lin(x), rtol=1e-5, atol=1e-5), rows
    back = packed.unpack()
    assert torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)
    assert set(packed.state_dict()) == {"weight", "bias"} and torch.equal(packed.state_dict()["weight"], lin.weight)


def test_packed_model_logits_generation_and_state_dict():
    ref, model = make(), make()
    pack_linear_layers(model)
    assert is_packed(model) and isinstance(model.lm_head, PackedLinear)
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
    a = generate(ref, ids, max_new_tokens=12, do_sample=False, eos_token_id=[])
    b = generate(model, ids, max_new_tokens=12, do_sample=False, eos_token_id=[])
    assert torch.equal(a, b)
    for (k, x), (k2, y) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(x, y)
    unpack_linear_layers(model)
    assert not is_packed(model) and isinstance(model.lm_head, torch.nn.Linear)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_tied_head_is_not_duplicated_and_training_is_refused():
    model = make(tied=True)
    pack_linear_layers(model)
    assert model.lm_head.weight is model.transformer.wte.weight  # left as a plain tied Linear
    x = torch.randn(1, 4, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference"):
        model.transformer.h[0].mlp.w1(x)


def test_loaded_packed_model_runs_outside_no_grad(tmp_path):
    # transformers users call model(ids) without torch.no_grad(); packed (inference) models are frozen
    from qwen.checkpoint import init_checkpoint, load_model

    init_checkpoint("tiny", tmp_path, seed=0)
    model = load_model(tmp_path, progress=False)
    assert is_packed(model) and not any(p.requires_grad for p in model.parameters())
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size) and torch.isfinite(logits).all()
