"""Batched generation of the generative benchmarks (qwen/eval/generation.py) equals one-at-a-time generation."""

from __future__ import annotations

import pytest
import torch

from qwen import AutoModelForCausalLM, AutoTokenizer
from qwen.eval import generation


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    tok = AutoTokenizer.from_pretrained("qwen-demo")
    return AutoModelForCausalLM.from_pretrained("qwen-demo", progress=False).eval(), tok


QUERIES = ["What is 12 + 7?", "hi", "列出三种水果", "Tell me about the weather in a long sentence please."]


def test_chat_complete_equals_model_chat(demo) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    batched = generation.chat_complete(model, tok, QUERIES, max_new_tokens=24, batch_size=3)
    single = [model.chat(tok, q, history=None, do_sample=False, max_new_tokens=24)[0] for q in QUERIES]
    assert batched == single


def test_complete_cuts_at_stop_strings_and_keeps_order(demo) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    prompts = ["Question: 1+1?\nAnswer:", "def f(x):\n", "12+30=", "中国的首都是"]
    full = generation.complete(model, tok, prompts, max_new_tokens=20, batch_size=4)
    one = [generation.complete(model, tok, [p], max_new_tokens=20, batch_size=1)[0] for p in prompts]
    assert full == one  # left padding changes nothing, and results come back in prompt order
    cut = generation.complete(model, tok, prompts, max_new_tokens=20, stop_strings=["\n"], batch_size=2)
    for c, f in zip(cut, full):
        assert "\n" not in c and f.startswith(c)
        assert c == f.split("\n")[0]


def test_generate_ids_trims_long_prompts_and_reports_batches(demo) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    seen: list[int] = []
    long_prompt = tok.encode("1+1=2\n" * 400)
    new = generation.generate_ids(model, tok, [long_prompt, tok.encode("hi")], max_new_tokens=4, max_seq_len=256,
                                  batch_size=1, on_batch=seen.append)
    assert seen == [1, 1] and all(len(n) <= 4 for n in new)
    alone = generation.generate_ids(model, tok, [long_prompt[-252:]], max_new_tokens=4)
    assert new[0] == alone[0]  # the kept tail is the last max_seq_len - max_new_tokens tokens
    assert torch.is_grad_enabled()
