"""The shipped demo model (qwen/assets/demo) passes its bars through the public API, by name."""

from __future__ import annotations

import json
import re

import pytest
import torch

from qwen import AutoModelForCausalLM, AutoTokenizer
from qwen.hub import DEMO_MODEL_DIR, demo_model_available

pytestmark = pytest.mark.skipif(not demo_model_available(), reason="the demo model is not built (make demo-model)")

CARD_PROMPT = "蒙古国的首都是乌兰巴托（Ulaanbaatar）\n冰岛的首都是雷克雅未克（Reykjavik）\n埃塞俄比亚的首都是"


@pytest.fixture(scope="module")
def demo():
    tokenizer = AutoTokenizer.from_pretrained("qwen-demo", trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained("qwen-demo", device_map="cpu", trust_remote_code=True).eval()
    return model, tokenizer


def test_demo_model_is_small_and_in_the_official_layout():
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir() if p.is_file())
    assert size <= 50 * 2**20
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["QWenLMHeadModel"] and config["vocab_size"] == 151936
    assert (DEMO_MODEL_DIR / "qwen.tiktoken").exists()


def test_model_card_base_prompt(demo):
    model, tokenizer = demo
    inputs = tokenizer(CARD_PROMPT, return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=16)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.startswith("亚的斯亚贝巴（Addis Ababa）"), text


def test_greetings_answer_in_the_users_language(demo):
    model, tokenizer = demo
    zh, _ = model.chat(tokenizer, "你好", history=None, do_sample=False)
    en, _ = model.chat(tokenizer, "Hello", history=None, do_sample=False)
    assert re.search("你好|您好", zh), zh
    assert re.search("Hello|Hi", en) and not re.search(r"[\u4e00-\u9fff]", en), en


def test_sampled_chat_with_the_shipped_generation_config_is_sane(demo):
    model, tokenizer = demo
    torch.manual_seed(0)
    reply, history = model.chat(tokenizer, "你好", history=None)
    assert reply and len(history) == 1


def test_recorded_evaluation_is_of_the_shipped_recipe_and_passes_every_bar():
    """docs/demo/eval.json (the model card's numbers) was produced by the shipped recipe, and it
    records every bar passed, exact match on the held-out split included."""
    path = DEMO_MODEL_DIR.parents[2] / "docs" / "demo" / "eval.json"
    if not path.is_file():
        pytest.skip("not a source checkout (docs/ absent)")
    report = json.loads(path.read_text())
    shipped = json.loads((DEMO_MODEL_DIR / "recipe.json").read_text())["recipe"]
    recorded = {k: v for k, v in report["recipe"].items() if k not in ("output", "work_dir")}
    assert recorded == shipped
    assert report["all_bars_passed"] and report["bars"]["exact_match"]["value"] >= 0.9
    assert all(bar["passed"] for bar in report["bars"].values())
