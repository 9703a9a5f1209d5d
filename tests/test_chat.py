"""chat() / chat_stream() as the official API (spec §8.4-8.5), and ChatSession."""

from __future__ import annotations

import copy

import pytest

from qwen.chat import ChatSession, chat, chat_stream
from qwen.chat_template import make_context
from qwen.config import preset_config
from scripted import Scripted
from qwen.generate import GenerationConfig
from qwen.model import QWenLMHeadModel
from qwen.tokenizer import QWenTokenizer

IM_START, IM_END, EOD = 151644, 151645, 151643
NIHAO_CONTEXT = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 108386, 151645,
                 198, 151644, 77091, 198]
GREEDY = dict(do_sample=False, max_new_tokens=16)


@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer()


@pytest.fixture(scope="module")
def model() -> QWenLMHeadModel:
    m = QWenLMHeadModel(preset_config("tiny"))
    m.init_weights(seed=0)
    m.generation_config = GenerationConfig.from_preset("qwen-7b-chat")
    return m.eval()


def enc(tok: QWenTokenizer, *texts: str) -> list[int]:
    return [i for t in texts for i in tok.encode(t, allowed_special=set())]


# ------------------------------------------------------------------ chat()
def test_chat_prompt_stop_words_and_response(tok: QWenTokenizer) -> None:
    script = enc(tok, " Hello", "!") + [IM_END] + enc(tok, " junk")
    m = Scripted(script)
    response, history = chat(m, tok, "你好", history=None, max_new_tokens=50)
    assert m.prompts[0] == NIHAO_CONTEXT  # system "You are a helpful assistant." by default
    assert response == "Hello!"
    assert history == [("你好", "Hello!")]
    assert m.forward_calls == len(enc(tok, " Hello", "!")) + 1  # stopped at <|im_end|>, eos appended for free


def test_chat_keeps_the_last_token_when_the_budget_ends_the_reply(tok: QWenTokenizer) -> None:
    # The official decode_tokens dropped " world" here (no stop marker was generated).
    m = Scripted(enc(tok, "Hello", " world", " and more"))
    response, _ = chat(m, tok, "hi", max_new_tokens=len(enc(tok, "Hello", " world")))
    assert response == "Hello world"


def test_chat_does_not_mutate_history(tok: QWenTokenizer) -> None:
    history = [["q1", "r1"], ("q2", "r2")]
    snapshot = copy.deepcopy(history)
    response, new_history = chat(Scripted(enc(tok, "ok") + [IM_END]), tok, "q3", history=history)
    assert history == snapshot
    assert new_history == [("q1", "r1"), ("q2", "r2"), ("q3", "ok")]
    assert new_history[0] is not history[0]


def test_chat_user_stop_words_and_window(tok: QWenTokenizer) -> None:
    m = Scripted(enc(tok, "Hello", " STOP", " more", " text") + [IM_END])
    response, _ = chat(m, tok, "hi", stop_words_ids=[enc(tok, " STOP")])
    assert response == "Hello STOP"  # as the official: chatml decoding keeps user stop words
    long_history = [("question " * 50, "answer " * 50)] * 3
    m = Scripted(enc(tok, "x") + [IM_END])
    chat(m, tok, "hi", history=long_history, max_window_size=100)
    chat(m, tok, "hi", history=[])
    assert m.prompts[0] == m.prompts[1]  # every turn was over budget
    chat(m, tok, "hi", history=long_history)  # default window (24000 from the config) keeps them
    assert len(m.prompts[2]) > len(m.prompts[1]) + 300


def test_chat_rejects_base_models_and_stream_flag(tok: QWenTokenizer) -> None:
    base = Scripted([EOD], generation_config=GenerationConfig.from_preset("qwen-7b"))
    with pytest.raises(ValueError, match="base"):
        chat(base, tok, "hi")
    with pytest.raises(ValueError, match="base"):
        ChatSession(base, tok)
    with pytest.raises(ValueError, match="chat_stream"):
        chat(Scripted([EOD]), tok, "hi", stream=True)


def test_chat_on_a_real_tiny_model(model: QWenLMHeadModel, tok: QWenTokenizer) -> None:
    response, history = model.chat(tok, "你好", history=None, **GREEDY)
    again, _ = chat(model, tok, "你好", **GREEDY)
    assert response == again and history == [("你好", response)]
    a, _ = chat(model, tok, "你好", seed=3, max_new_tokens=8)  # config: do_sample, top_p 0.8
    b, _ = chat(model, tok, "你好", seed=3, max_new_tokens=8)
    assert a == b


def test_chat_stream_is_cumulative_and_ends_with_chat_response(model: QWenLMHeadModel, tok: QWenTokenizer) -> None:
    history = [("hi", "hello there")]
    response, _ = chat(model, tok, "你好", history=history, **GREEDY)
    outs = list(model.chat_stream(tok, "你好", history=history, **GREEDY))
    assert outs and outs[-1] == response
    assert all(b.startswith(a) for a, b in zip(outs, outs[1:]))
    assert all("\ufffd" not in o for o in outs)


def test_chat_stream_scripted_utf8(tok: QWenTokenizer) -> None:
    script = [51461, 117, 51461, 117] + [IM_END]
    outs = list(chat_stream(Scripted(script), tok, "hi"))
    assert outs == ["根", "根 根"]


# ------------------------------------------------------------------ ChatSession
def test_session_matches_chat_and_reuses_the_cache(model: QWenLMHeadModel, tok: QWenTokenizer) -> None:
    session = ChatSession(model, tok, generation_config=dict(GenerationConfig.from_preset("qwen-7b-chat").to_dict(),
                                                             **GREEDY))
    r1 = session.send("你好")
    assert session.last_response is not None and session.last_response.cached_tokens == 0
    r2 = session.send("tell me more")
    assert session.last_response.cached_tokens > 0  # the previous turn's prefix was not recomputed
    ref1, hist = chat(model, tok, "你好", **GREEDY)
    ref2, hist = chat(model, tok, "tell me more", history=hist, **GREEDY)
    assert (r1, r2) == (ref1, ref2)
    assert session.history == hist
    _, context = make_context(tok, "next", history=hist, system=session.system, max_window_size=24000)
    assert session.last_response.prompt_tokens < len(context)


def test_session_stream_clear_and_config(model: QWenLMHeadModel, tok: QWenTokenizer) -> None:
    session = ChatSession(model, tok, generation_config=GenerationConfig(**GREEDY))
    reference = ChatSession(model, tok, generation_config=GenerationConfig(**GREEDY)).send("你好")
    deltas = list(session.send("你好", stream=True))
    assert "".join(deltas).strip() == reference and session.history == [("你好", reference)]
    session.clear()
    assert session.history == [] and session.send("你好") == reference
    session.set_config(max_new_tokens=2)
    assert session.generation_config.max_new_tokens == 2
    session.send("again")
    assert session.last_response.generation_tokens <= 2
    with pytest.raises(ValueError):
        session.set_config(not_a_field=1)
    with pytest.raises(ValueError):
        session.set_config(chat_format="raw")


def test_session_system_prompt(tok: QWenTokenizer) -> None:
    m = Scripted(enc(tok, "fine") + [IM_END])
    session = ChatSession(m, tok, system="Be terse.", history=[("a", "b")])
    assert session.send("hi") == "fine"
    _, expected = make_context(tok, "hi", history=[("a", "b")], system="Be terse.")
    assert m.prompts[0] == expected
