"""The OpenAI-compatible server end to end: real uvicorn on loopback, the real ``openai`` client."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402  (installed with openai)

from qwen import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from qwen.chat_template import render_messages  # noqa: E402
from qwen.serve.app import create_app  # noqa: E402
from qwen.serve.engine import Engine  # noqa: E402
from qwen.serve.react import TOOL_DESC  # noqa: E402
from serve_helpers import ScriptedQwen, ServerThread  # noqa: E402

MODEL = "qwen-demo"
USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    return AutoModelForCausalLM.from_pretrained(MODEL), AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def server(demo):  # type: ignore[no-untyped-def]
    model, tok = demo
    with Engine(model, tok, max_batch_size=16) as engine:
        app = create_app(engine, tok, model_id=MODEL, generation_config=model.generation_config)
        with ServerThread(app) as url:
            yield url, engine


@pytest.fixture()
def client(server):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def chat(client, messages=USER, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


# ------------------------------------------------------------------ the basics
def test_models_health_and_metrics(server, client) -> None:  # type: ignore[no-untyped-def]
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"
    chat(client, max_tokens=2)
    text = httpx.get(server[0] + "/metrics").text
    for name in ("qwen_requests_total", "qwen_generation_tokens_total", "qwen_queue_depth",
                 "qwen_request_latency_seconds_sum", "qwen_time_to_first_token_seconds_count"):
        assert f"\n{name} " in "\n" + text
    assert 'qwen_http_responses_total{path="/v1/chat/completions",status="200"}' in text


def test_non_stream_and_stream_agree_and_usage_counts_tokens(demo, client) -> None:  # type: ignore[no-untyped-def]
    _, tok = demo
    r = chat(client)
    content = r.choices[0].message.content
    assert r.model == MODEL and r.id.startswith("chatcmpl-") and r.created > 0
    assert r.choices[0].finish_reason == "stop" and content
    assert r.usage.prompt_tokens == len(render_messages(tok, USER)[0])
    assert r.usage.completion_tokens == len(tok.encode(content)) + 1  # + the <|im_end|> that ended it
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_content_parts_and_system_anywhere(client) -> None:  # type: ignore[no-untyped-def]
    parts = [{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    assert chat(client, parts).choices[0].message.content == chat(client).choices[0].message.content
    # A system message after the first one is a ChatML system turn (the official server answered 400).
    later = USER + [{"role": "assistant", "content": "Hi!"}, {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "你好"}]
    assert chat(client, later).choices[0].finish_reason in ("stop", "length")


def test_stop_strings_max_tokens_and_n(client) -> None:  # type: ignore[no-untyped-def]
    full = chat(client).choices[0].message.content
    stop = full[5:9]  # cuts through tokens
    r = chat(client, stop=[stop, "zzzz"])
    assert r.choices[0].message.content == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, stop=stop, stream=True) if c.choices)
    assert streamed == full[: full.index(stop)]

    r = chat(client, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2

    r = chat(client, n=2, max_tokens=4)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 8
    r = chat(client, n=2, temperature=1.5, seed=3, max_tokens=12)
    again = chat(client, n=2, temperature=1.5, seed=3, max_tokens=12)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]  # seeded


def test_logprobs(client) -> None:  # type: ignore[no-untyped-def]
    r = chat(client, logprobs=True, top_logprobs=3, max_tokens=4)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the top token


def test_completions_for_raw_prompts(client) -> None:  # type: ignore[no-untyped-def]
    prompt = "蒙古国的首都是乌兰巴托（Ulaanbaatar）\n冰岛的首都是雷克雅未克（Reykjavik）\n埃塞俄比亚的首都是"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=1)
    assert r.object == "text_completion" and r.choices[0].text.startswith("亚的斯亚贝巴")
    assert len(r.choices[0].logprobs.tokens) == 12
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


# ------------------------------------------------------------------ errors: status, OpenAI shape, still serving
def post(url: str, body, headers=None) -> httpx.Response:  # type: ignore[no-untyped-def]
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(url + "/v1/chat/completions", content=content,
                      headers={"content-type": "application/json", **(headers or {})})


@pytest.mark.parametrize("body, status, needle", [
    ("{not json", 400, "not valid JSON"),
    ({"model": MODEL}, 400, "'messages'"),
    ({"model": MODEL, "messages": []}, 400, "'messages'"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "user"),
    ({"model": MODEL, "messages": USER, "temperature": 3}, 400, "temperature"),
    ({"model": MODEL, "messages": USER, "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": USER, "n": 0}, 400, "'n'"),
    ({"model": MODEL, "messages": USER, "presence_penalty": 9}, 400, "presence_penalty"),
    ({"model": MODEL, "messages": USER, "stop": 5}, 400, "stop"),
    ({"model": "gpt-4o", "messages": USER}, 404, "does not exist"),
    ({"model": MODEL, "messages": USER, "max_tokens": 5000}, 400, "maximum context length is 512"),
])
def test_bad_requests_get_openai_errors(server, client, body, status, needle) -> None:  # type: ignore[no-untyped-def]
    r = post(server[0], body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]
    assert chat(client, max_tokens=2).choices[0].message.content  # still serving


def test_openai_client_raises_the_matching_exceptions(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError, match="512 tokens"):
        chat(client, max_tokens=10_000)


def test_api_key(demo) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    with Engine(model, tok) as engine, ServerThread(create_app(engine, tok, model_id=MODEL, api_key="sk-1")) as url:
        assert post(url, {"messages": USER}).status_code == 401
        assert post(url, {"messages": USER}, {"authorization": "Bearer wrong"}).status_code == 401
        good = openai.OpenAI(base_url=url + "/v1", api_key="sk-1", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="sk-2", max_retries=0).models.list()
        assert chat(good, max_tokens=2).choices[0].message.content
        assert httpx.get(url + "/health").status_code == 200  # health and metrics stay open


# ------------------------------------------------------------------ concurrency
def test_sixteen_concurrent_streams_equal_single_requests(client) -> None:  # type: ignore[no-untyped-def]
    questions = ["你好", "Hello", "What is the capital of France?", "法国的首都是哪里？", "12+34等于多少？", "Who are you?",
                 "床前明月光的下一句是什么？", "What is 5 + 7?", "日本的首都是哪里？", "Hi", "What is the capital of Peru?",
                 "你是谁？", "23+45等于多少？", "What is 60 - 13?", "《静夜思》的作者是谁？", "Good morning"]
    msgs = [[{"role": "user", "content": q}] for q in questions]
    alone = [chat(client, m, max_tokens=24).choices[0].message.content for m in msgs]
    got: list = [None] * 16
    barrier = threading.Barrier(16)

    def worker(i: int) -> None:
        barrier.wait()
        got[i] = "".join(c.choices[0].delta.content or ""
                         for c in chat(client, msgs[i], max_tokens=24, stream=True) if c.choices)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone


def test_cancelled_stream_frees_its_slot_and_queue_full_gives_429(demo) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    with Engine(model, tok, max_batch_size=1, max_queue=1) as engine, \
            ServerThread(create_app(engine, tok, model_id=MODEL)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        stream = chat(client, stream=True, max_tokens=400, extra_body={"ignore_eos": True})
        next(iter(stream))
        # The only row is busy: one request may wait, the next is refused with 429 + Retry-After.
        waiting = threading.Thread(target=lambda: chat(client, max_tokens=2))
        waiting.start()
        deadline = time.time() + 10
        while engine.queue_depth < 1 and time.time() < deadline:
            time.sleep(0.01)
        r = post(url, {"messages": USER, "max_tokens": 2})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        stream.close()  # the client goes away mid-stream: its row frees, the waiting request runs
        waiting.join(timeout=30)
        assert not waiting.is_alive()
        deadline = time.time() + 10
        while engine.stats.cancelled < 1 and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats.cancelled == 1 and engine.stats.generation_tokens < 400
        assert chat(client, max_tokens=2).choices[0].message.content  # and the server goes on


# ------------------------------------------------------------------ function calling (scripted model)
WEATHER = {"name": "get_weather", "description": "Current weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def react_server(demo):  # type: ignore[no-untyped-def]
    _, tok = demo
    call = 'Thought: I should look up the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: made up'
    final = " I now know the final answer.\nFinal Answer: It is sunny in Paris, 21°C."

    def script_for(prompt: list[int]) -> list[int]:
        text = tok.decode(prompt)
        reply = final if text.rstrip().endswith("Thought:") else call
        return list(tok.encode(reply)) + [tok.im_end_id]

    model = ScriptedQwen(script_for)
    with Engine(model, tok) as engine, ServerThread(create_app(engine, tok, model_id=MODEL)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), model, tok


def tok_decode_last(react_server) -> str:  # type: ignore[no-untyped-def]
    _, model, tok = react_server
    return tok.decode(model.prompts[-1])


def _observation_round(call_message: dict, result_role: str, extra: dict) -> list[dict]:
    return QUESTION + [call_message, {"role": result_role, "content": "sunny, 21°C", **extra}]


def test_legacy_functions_call_observation_final_answer(react_server) -> None:  # type: ignore[no-untyped-def]
    client, model, tok = react_server
    r = chat(client, QUESTION, functions=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "Paris"}
    assert choice.message.content == "I should look up the weather."
    prompt = tok.decode(model.prompts[-1])
    tool_line = TOOL_DESC.format(name_for_model="get_weather", name_for_human="get_weather",
                                 description_for_model="Current weather of a city.",
                                 parameters=json.dumps(WEATHER["parameters"], ensure_ascii=False))
    assert tool_line in prompt and "Question: What's the weather in Paris?<|im_end|>" in prompt
    assert "Action: the action to take, should be one of [get_weather]" in prompt

    call_msg = {"role": "assistant", "content": choice.message.content,
                "function_call": {"name": "get_weather", "arguments": choice.message.function_call.arguments}}
    r = chat(client, _observation_round(call_msg, "function", {"name": "get_weather"}), functions=[WEATHER])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == "It is sunny in Paris, 21°C."
    prompt = tok.decode(model.prompts[-1])
    assert prompt.endswith('Action Input: {"city": "Paris"}\nObservation: sunny, 21°C\nThought:')  # turn left open


def test_tools_api_and_streaming_function_calls(react_server) -> None:  # type: ignore[no-untyped-def]
    client, model, tok = react_server
    tools = [{"type": "function", "function": WEATHER}]
    r = chat(client, QUESTION, tools=tools, tool_choice="auto")
    tc = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and tc[0].function.name == "get_weather"
    assert tc[0].id.startswith("call_") and json.loads(tc[0].function.arguments) == {"city": "Paris"}

    # Streaming: the call arrives in the final delta (the official server refused to stream with functions).
    chunks = list(chat(client, QUESTION, tools=tools, stream=True))
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert calls and calls[0][0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # As without streaming, the content is the Thought (the Action lines are not content).
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content

    call_msg = {"role": "assistant", "content": None, "tool_calls": [
        {"id": tc[0].id, "type": "function", "function": {"name": "get_weather", "arguments": tc[0].function.arguments}}]}
    msgs = _observation_round(call_msg, "tool", {"tool_call_id": tc[0].id})
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, msgs, tools=tools, stream=True) if c.choices)
    assert streamed == "It is sunny in Paris, 21°C."
    legacy = list(chat(client, QUESTION, functions=[WEATHER], stream=True))
    assert legacy[-1].choices[0].finish_reason == "function_call"
    assert [c.choices[0].delta.function_call.name for c in legacy if c.choices and c.choices[0].delta.function_call] \
        == ["get_weather"]

    # tool_choice "none": no tools in the prompt, plain answer.
    chat(client, QUESTION, tools=tools, tool_choice="none")
    assert "get_weather" not in tok.decode(model.prompts[-1])


# ------------------------------------------------------------------ LangChain's OpenAI chat model
def test_langchain_chat_openai(server, client, react_server) -> None:  # type: ignore[no-untyped-def]
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.tools import tool

    llm = lc.ChatOpenAI(base_url=server[0] + "/v1", api_key="x", model=MODEL, temperature=0, max_tokens=24,
                        max_retries=0)
    expected = chat(client, max_tokens=24).choices[0].message.content
    assert llm.invoke("Hello").content == expected
    assert "".join(c.content for c in llm.stream("Hello")) == expected

    @tool
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        return "sunny"

    react_client = react_server[0]
    scripted = lc.ChatOpenAI(base_url=str(react_client.base_url), api_key="x", model=MODEL, temperature=0,
                             max_retries=0)
    msg = scripted.bind_tools([get_weather]).invoke("What's the weather in Paris?")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Paris"})]
    # The tool-calling loop LangChain agents run: call, run the tool, send a ToolMessage, final answer.
    from langchain_core.messages import HumanMessage, ToolMessage

    bound = scripted.bind_tools([get_weather])
    messages = [HumanMessage("What's the weather in Paris?")]
    for _ in range(3):
        ai = bound.invoke(messages)
        messages.append(ai)
        if not ai.tool_calls:
            break
        for call in ai.tool_calls:
            messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    assert [type(m).__name__ for m in messages] == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert messages[-1].content == "It is sunny in Paris, 21°C."
    assert tok_decode_last(react_server).endswith("Observation: sunny\nThought:")
