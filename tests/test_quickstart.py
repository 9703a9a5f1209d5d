"""The seeds' snippets (Qwen-7B-Chat / Qwen-7B model cards, the official README's batch recipe) run unchanged
apart from the import lines and the path. Tiny random checkpoints stand in for the real ones, so the
tests check that the API calls work and return well-formed results, not what a trained model says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen.checkpoint import init_checkpoint


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("Qwen-7B-Chat")
    init_checkpoint("tiny", path, seed=0, chat=True)
    return str(path)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("Qwen-7B")
    init_checkpoint("tiny", path, seed=0, chat=False)
    return str(path)


def test_qwen_7b_chat_model_card(chat_dir):
    from qwen import AutoModelForCausalLM, AutoTokenizer
    from qwen import GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(chat_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(chat_dir, device_map="auto", trust_remote_code=True).eval()
    model.generation_config = GenerationConfig.from_pretrained(chat_dir, trust_remote_code=True)
    model.generation_config.max_new_tokens = 16  # the only change: keep the random model's answers short
    response, history = model.chat(tokenizer, "你好", history=None)
    assert isinstance(response, str) and history == [("你好", response)]
    response, history = model.chat(tokenizer, "浙江的省会在哪里？", history=history)
    response, history = model.chat(tokenizer, "它有什么好玩的景点", history=history)
    assert len(history) == 3 and history[2] == ("它有什么好玩的景点", response)
    # Precision flags from the model card.
    for flag in ("bf16", "fp16", "fp32"):
        m = AutoModelForCausalLM.from_pretrained(chat_dir, device_map="cpu", trust_remote_code=True, **{flag: True})
        assert m.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[flag]


def test_qwen_7b_base_model_card(base_dir):
    from qwen import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(base_dir, device_map="auto", trust_remote_code=True).eval()
    inputs = tokenizer("蒙古国的首都是乌兰巴托（Ulaanbaatar）\n冰岛的首都是雷克雅未克（Reykjavik）\n埃塞俄比亚的首都是",
                       return_tensors="pt")
    inputs = inputs.to(model.device)
    pred = model.generate(**inputs, max_new_tokens=8)
    assert pred.shape[0] == 1 and pred.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(pred[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])
    text = tokenizer.decode(pred.cpu()[0], skip_special_tokens=True)
    assert text.startswith("蒙古国的首都是乌兰巴托")
    with pytest.raises(ValueError, match="chat"):
        model.chat(tokenizer, "你好", history=None)  # base models refuse chat, as the official code does


def test_official_batch_inference_recipe(chat_dir):
    from qwen import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from qwen.chat_template import decode_tokens, make_context

    tokenizer = AutoTokenizer.from_pretrained(chat_dir, pad_token="<|extra_0|>", eos_token="<|endoftext|>",
                                              padding_side="left", trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(chat_dir, pad_token_id=tokenizer.pad_token_id, device_map="auto",
                                                 trust_remote_code=True).eval()
    model.generation_config = GenerationConfig.from_pretrained(chat_dir, pad_token_id=tokenizer.pad_token_id)
    model.generation_config.max_new_tokens = 12
    model.generation_config.do_sample = False  # so batched rows can be compared with single rows below

    all_raw_text = ["我想听你说爱我。", "今天我想吃点啥，甜甜的，推荐下", "我马上迟到了，怎么做才能不迟到"]
    batch_raw_text = []
    for q in all_raw_text:
        raw_text, _ = make_context(tokenizer, q, system="You are a helpful assistant.",
                                   max_window_size=model.generation_config.max_window_size,
                                   chat_format=model.generation_config.chat_format)
        batch_raw_text.append(raw_text)
    batch_input_ids = tokenizer(batch_raw_text, padding="longest")
    batch_input_ids = torch.LongTensor(batch_input_ids["input_ids"]).to(model.device)
    batch_out_ids = model.generate(batch_input_ids, return_dict_in_generate=False,
                                   generation_config=model.generation_config)
    padding_lens = [batch_input_ids[i].eq(tokenizer.pad_token_id).sum().item() for i in range(batch_input_ids.size(0))]
    batch_response = [
        decode_tokens(batch_out_ids[i][padding_lens[i]:], tokenizer, raw_text_len=len(batch_raw_text[i]),
                      context_length=(batch_input_ids[i].size(0) - padding_lens[i]), chat_format="chatml",
                      verbose=False, errors="replace")
        for i in range(len(all_raw_text))
    ]
    # Each batched answer equals the single-query answer (greedy): left padding does not leak.
    for q, batched in zip(all_raw_text, batch_response):
        single, _ = model.chat(tokenizer, q, history=None, generation_config=model.generation_config)
        assert batched == single


def test_paths_are_local_only():
    from qwen import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained("qwen-demo")) == 151851  # the bundled vocabulary
    with pytest.raises(FileNotFoundError):
        AutoTokenizer.from_pretrained(str(Path("/nonexistent/Qwen-7B")))
