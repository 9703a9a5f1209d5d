"""ReAct prompt building and parsing (the official openai_api.py rules) and message validation."""

from __future__ import annotations

import pytest

from qwen.serve.protocol import APIError, build_chat_prompt, parse_sampling
from qwen.serve.react import REACT_INSTRUCTION, ReactStreamParser, parse_response, react_instruction
from qwen.tokenizer import QWenTokenizer

FN = {"name": "search", "description": "Search the web.", "parameters": [{"name": "query", "required": True}]}


@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer()


def test_instruction_text_follows_the_official_template() -> None:
    two = [FN, {"name_for_model": "img", "name_for_human": "Image", "description_for_model": "Draw.", "parameters": {}}]
    text = react_instruction(two)
    assert text.startswith("Answer the following questions as best you can. You have access to the following APIs:\n\n"
                           "search: Call this tool to interact with the search API. What is the search API useful for? "
                           'Search the web. Parameters: [{"name": "query", "required": true}]\n\n'
                           "img: Call this tool to interact with the Image API.")
    assert "should be one of [search, img]\n" in text and text.endswith("Begin!")
    assert REACT_INSTRUCTION.count("{tools_text}") == 1


@pytest.mark.parametrize("text, content, call", [
    ("Thought: need it\nAction: search\nAction Input: {\"q\": 1}\nObservation:", "need it", ("search", '{"q": 1}')),
    ("Thought: need it\nAction: search\nAction Input: {\"q\": 1}", "need it", ("search", '{"q": 1}')),  # stop ate it
    ("Thought: I now know the final answer.\nFinal Answer: 42", "42", None),
    ("Thought: x\nFinal Answer: a\nThought: y\nFinal Answer: b", "b", None),  # the last one wins
    ("just text", "just text", None),
    ("Action: search\nAction Input: x", "Action: search\nAction Input: x", None),  # no newline before Action
])
def test_parse_response(text: str, content: str, call: tuple | None) -> None:
    got, fc = parse_response(text)
    assert got == content
    assert (fc.name, fc.arguments) == call if call else fc is None


def test_stream_parser_streams_only_the_final_answer() -> None:
    p = ReactStreamParser()
    pieces = ["Thought: I now", " know the final answer.\nFinal", " Answer: It is", " sunny", "."]
    out = "".join(p.feed(x) for x in pieces)
    rest, call = p.finish()
    assert out + rest == "It is sunny." and call is None
    p = ReactStreamParser()
    assert "".join(p.feed(x) for x in ["Thought: look\nAction: s", "earch\nAction Input: {}"]) == ""
    content, call = p.finish()
    assert call.name == "search" and content == "look"


def test_instruction_goes_into_the_latest_answered_question(tok: QWenTokenizer) -> None:
    def prompt_text(messages: list[dict]) -> str:
        return tok.decode(build_chat_prompt(tok, {"messages": messages, "functions": [FN]}).ids)

    one = prompt_text([{"role": "user", "content": "Q1"}])
    assert "Begin!\n\nQuestion: Q1<|im_end|>" in one
    multi = prompt_text([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                         {"role": "user", "content": "Q2"}])
    # As the official server: into the previous (answered) round, and earlier answers become Final Answers.
    assert "Question: Q1<|im_end|>" in multi and "user\nQ2<|im_end|>" in multi
    assert "Thought: I now know the final answer.\nFinal Answer: A1" in multi


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "function", "content": "x"}], "must follow an assistant"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text parts"),
    ([{"role": "user", "content": 3}], "string or a list"),
    ([{"role": "system", "content": "s"}], "at least one user"),
    (["hi"], "must be an object"),
])
def test_message_errors(tok: QWenTokenizer, messages: list, needle: str) -> None:
    with pytest.raises(APIError, match=needle) as info:
        build_chat_prompt(tok, {"messages": messages})
    assert info.value.status == 400


def test_sampling_fields() -> None:
    s = parse_sampling({"temperature": 0.5, "top_k": -1, "max_completion_tokens": 9, "stop": "x", "logprobs": True,
                        "top_logprobs": 2, "seed": -1})
    assert (s.temperature, s.top_k, s.max_tokens, s.stop, s.logprobs, s.seed) == (0.5, 0, 9, ["x"], 2, 2**63 - 1)
    with pytest.raises(APIError, match="top_logprobs"):
        parse_sampling({"top_logprobs": 2})
    with pytest.raises(APIError, match="stream_options"):
        parse_sampling({"stream_options": {"include_usage": True}})
