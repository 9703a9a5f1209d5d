"""bitsandbytes loading (load_in_4bit / load_in_8bit / a BitsAndBytesConfig-style dict), as the early model card."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from qwen import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

CARD_PROMPT = "蒙古国的首都是乌兰巴托（Ulaanbaatar）\n冰岛的首都是雷克雅未克（Reykjavik）\n埃塞俄比亚的首都是"


@pytest.mark.parametrize("kwargs, layer", [
    (dict(load_in_4bit=True), "Linear4bit"),
    (dict(load_in_8bit=True), "Linear8bitLt"),
    (dict(quantization_config={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                               "bnb_4bit_compute_dtype": "float32"}), "Linear4bit"),
])
def test_demo_model_loads_quantized_and_still_answers(kwargs: dict, layer: str) -> None:
    tok = AutoTokenizer.from_pretrained("qwen-demo")
    model = AutoModelForCausalLM.from_pretrained("qwen-demo", **kwargs)
    block = model.transformer.h[0]
    assert {type(m).__name__ for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.w1, block.mlp.w2,
                                        block.mlp.c_proj)} == {layer}
    assert isinstance(model.lm_head, torch.nn.Linear)  # embeddings and lm_head stay in float
    ids = torch.tensor([tok.encode(CARD_PROMPT)])
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).startswith("亚的斯亚贝巴")


def test_conflicting_flags_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        AutoModelForCausalLM.from_pretrained("qwen-demo", load_in_4bit=True, load_in_8bit=True)


def test_nf4_layers_whose_outputs_are_not_a_multiple_of_32_run(tmp_path) -> None:
    # bitsandbytes' CPU repacking asserts out_features % 32 == 0; the demo model's MLP has 344 outputs.
    pytest.importorskip("bitsandbytes")
    from qwen import AutoModelForCausalLM
    from qwen.checkpoint import init_checkpoint

    init_checkpoint("tiny-vocab", tmp_path / "m", seed=0, intermediate_size=344)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", load_in_4bit=True, progress=False).eval()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m", progress=False).eval()
    ids = torch.randint(0, 500, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert float((got - want).norm() / want.norm()) < 0.1  # NF4: a few % on random weights
