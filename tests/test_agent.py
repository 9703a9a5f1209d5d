"""qwen.agent: tool schemas from functions, the react_demo.py prompt, robust parsing, the loop, backends.

Expected prompt strings are written by hand from the official examples/react_demo.py (TOOL_DESC
plus " Format the arguments as a JSON object.", PROMPT_REACT, build_input_text's placement and
stripping, "\\nObservation: {result}\\nThought:" appended to the open assistant turn).
"""

from __future__ import annotations

import sys
from typing import Optional

import pytest

from qwen.agent import (
    Agent,
    AgentResult,
    LocalBackend,
    OpenAIBackend,
    ReactPrompt,
    ScriptedBackend,
    SectionStream,
    Tool,
    ToolInputError,
    ToolParam,
    build_prompt,
    get_tool,
    parse_docstring,
    parse_output,
    prompt_ids,
    register_tool,
    registered_tools,
    tool,
    unregister_tool,
)

# ---------------------------------------------------------------------------------------------- fixtures
CALLS: list[tuple] = []


@tool(name_for_human="Search")
def search(query: str) -> str:
    """Look something up.

    Args:
        query: what to look for
    """
    CALLS.append(("search", query))
    return f"results for {query}"


@tool
def add(a: int, b: int = 1) -> int:
    """Add two integers.

    Args:
        a (int): the first addend.
        b (int): the second addend,
            one by default.
    """
    CALLS.append(("add", a, b))
    return a + b


@tool
def explode(reason: str) -> str:
    """Always fails."""
    raise RuntimeError(f"boom: {reason}")


@pytest.fixture(autouse=True)
def _clear_calls():  # type: ignore[no-untyped-def]
    CALLS.clear()
    yield


SEARCH_LINE = ('search: Call this tool to interact with the Search API. What is the Search API useful for? '
               'Look something up. Parameters: [{"name": "query", "description": "what to look for", '
               '"required": true, "schema": {"type": "string"}}] Format the arguments as a JSON object.')


def instruction(tool_lines: str, names: str) -> str:
    """react_demo.py's PROMPT_REACT without the question, typed out."""
    return ("Answer the following questions as best you can. You have access to the following APIs:\n\n"
            f"{tool_lines}\n\n"
            "Use the following format:\n\n"
            "Question: the input question you must answer\n"
            "Thought: you should always think about what to do\n"
            f"Action: the action to take, should be one of [{names}]\n"
            "Action Input: the input to the action\n"
            "Observation: the result of the action\n"
            "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
            "Thought: I now know the final answer\n"
            "Final Answer: the final answer to the original input question\n\n"
            "Begin!\n\n"
            "Question: ")


SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>"


def user(text: str) -> str:
    return f"\n<|im_start|>user\n{text}<|im_end|>"


def assistant(text: str, open_: bool = False) -> str:
    return f"\n<|im_start|>assistant\n{text}" + ("" if open_ else "<|im_end|>")


# ---------------------------------------------------------------------------------------------- tool schemas
def test_schema_from_signature_and_google_docstring() -> None:
    def lookup(city: str, days: int, threshold: float = 0.5, metric: bool = True, tags: list[str] = [],  # noqa: B006
               note: Optional[str] = None, region: "str | None" = "eu") -> dict:
        """Weather forecast
        for a city.

        Args:
            city: the city name,
                e.g. Paris.
            days (int): how many days.
            threshold: rain probability cut-off.
            metric: Celsius when true.
            tags: labels to attach.
            note: free text.

        Returns:
            the forecast.
        """
        return {}

    t = Tool.from_function(lookup, name_for_human="Weather")
    assert t.name == "lookup" and t.name_for_human == "Weather"
    assert t.description == "Weather forecast for a city."
    assert t.to_qwen() == {
        "name_for_human": "Weather", "name_for_model": "lookup", "description_for_model": "Weather forecast for a city.",
        "args_format": "json",
        "parameters": [
            {"name": "city", "description": "the city name, e.g. Paris.", "required": True, "schema": {"type": "string"}},
            {"name": "days", "description": "how many days.", "required": True, "schema": {"type": "integer"}},
            {"name": "threshold", "description": "rain probability cut-off.", "required": False,
             "schema": {"type": "number", "default": 0.5}},
            {"name": "metric", "description": "Celsius when true.", "required": False,
             "schema": {"type": "boolean", "default": True}},
            {"name": "tags", "description": "labels to attach.", "required": False,
             "schema": {"type": "array", "items": {"type": "string"}, "default": []}},
            {"name": "note", "description": "free text.", "required": False, "schema": {"type": "string"}},
            {"name": "region", "description": "", "required": False, "schema": {"type": "string", "default": "eu"}},
        ],
    }
    assert t.to_openai() == {"type": "function", "function": {
        "name": "lookup", "description": "Weather forecast for a city.",
        "parameters": {"type": "object", "required": ["city", "days"], "properties": {
            "city": {"type": "string", "description": "the city name, e.g. Paris."},
            "days": {"type": "integer", "description": "how many days."},
            "threshold": {"type": "number", "default": 0.5, "description": "rain probability cut-off."},
            "metric": {"type": "boolean", "default": True, "description": "Celsius when true."},
            "tags": {"type": "array", "items": {"type": "string"}, "default": [], "description": "labels to attach."},
            "note": {"type": "string", "description": "free text."},
            "region": {"type": "string", "default": "eu"},
        }}}}


def test_numpy_docstring_and_overrides() -> None:
    def f(x, n=3):  # type: ignore[no-untyped-def]
        """Scale things.

        Parameters
        ----------
        x : str
            The thing
            to scale.
        n : int
            Times.
        """

    assert parse_docstring(f.__doc__) == ("Scale things.", {"x": "The thing to scale.", "n": "Times."})
    t = Tool.from_function(f, name="scale", description="Custom.")
    assert (t.name, t.description) == ("scale", "Custom.")
    assert [(p.name, p.schema, p.required) for p in t.parameters] == [
        ("x", {"type": "string"}, True), ("n", {"type": "integer", "default": 3}, False)]  # type from the default


def test_decorated_function_stays_callable_and_call_returns_text() -> None:
    assert add(2, 3) == 5
    assert add.call('{"a": 2, "b": 3}') == "5"
    assert add.call({"a": "4"}) == "5"  # "4" -> 4, b defaults to 1
    assert search.call('{"query": "cats"}') == "results for cats"


@tool
def pair(x: str, y: str) -> str:
    """Two required strings."""
    return x + y


@pytest.mark.parametrize("t, arguments, message", [
    (add, '{"b": 2}', "tool 'add' needs the argument 'a'; write the Action Input as {\"a\": ..., \"b\": ...}"),
    (add, '{"a": "two"}', "argument 'a' of tool 'add' must be an integer, got \"two\""),
    (add, "[1, 2]", "argument 'a' of tool 'add' must be an integer, got [1, 2]"),  # a bare value goes to 'a'
    (add, '{"a": 1, "c": 2}', "tool 'add' has no parameter 'c' (its parameters: a, b)"),
    (add, "not json", "the Action Input of tool 'add' is not a JSON object: 'not json'"),  # 'a' takes no text
    (pair, "[1, 2]", "the Action Input of tool 'pair' must be a JSON object like {\"x\": ..., \"y\": ...}, got [1, 2]"),
    (pair, "{}", "tool 'pair' needs the arguments 'x', 'y'"),
])
def test_bad_arguments_raise_clear_errors(t: Tool, arguments: str, message: str) -> None:
    with pytest.raises(ToolInputError) as e:
        t.call(arguments)
    assert message in str(e.value)


def test_coercions_and_single_parameter_fallbacks() -> None:
    def f(flag: bool, xs: list[int], ratio: float) -> str:
        return f"{flag!r} {xs!r} {ratio!r}"

    t = Tool.from_function(f)
    assert t.call({"flag": "yes", "xs": "[1, 2]", "ratio": 2}) == "True [1, 2] 2.0"
    with pytest.raises(ToolInputError, match=r"argument 'xs\[1\]' of tool 'f' must be an integer"):
        t.call({"flag": True, "xs": [1, "x"], "ratio": 1})
    # one parameter: a bare JSON value, or raw text that is not JSON at all, is that parameter's value
    assert search.call('"dogs"') == "results for dogs"
    assert search.call("weather in Paris") == "results for weather in Paris"


def test_code_args_format_takes_the_fenced_block() -> None:
    def run_code(code: str) -> str:
        """Run Python."""
        return code

    t = Tool.from_function(run_code, args_format="code")
    assert t.to_qwen()["args_format"] == "code"
    assert t.call("```py\nprint(1)\nprint(2)\n```") == "print(1)\nprint(2)"
    assert t.call("print(3)") == "print(3)"
    assert t.call('{"code": "x = 1"}') == "x = 1"
    assert build_prompt("q", tools=[t]).query.count(
        "Parameters: [{\"name\": \"code\", \"description\": \"\", \"required\": true, \"schema\": {\"type\": \"string\"}}]"
        " Enclose the code within triple backticks (`) at the beginning and end of the code.") == 1


def test_tool_from_qwen_plugin_dict_and_registry() -> None:
    info = {"name_for_human": "文生图", "name_for_model": "image_gen", "description_for_model": "画图",
            "parameters": [{"name": "prompt", "description": "英文关键词", "required": True, "schema": {"type": "string"}}]}
    t = Tool.from_qwen(info, lambda prompt: {"image_url": prompt})
    assert {k: v for k, v in t.to_qwen().items() if k != "args_format"} == info
    assert t.call('{"prompt": "猫"}') == '{"image_url": "猫"}'  # non-strings become JSON, ensure_ascii=False

    register_tool("test_search", search)
    register_tool("test_factory", lambda: Tool("fresh", "", [ToolParam("x")], fn=lambda x: x))
    register_tool("test_lazy", "tests_agent_missing_module:thing")
    try:
        assert {"test_search", "test_factory", "test_lazy"} <= set(registered_tools())
        assert get_tool("test_search") is search
        assert get_tool("test_factory") is not get_tool("test_factory")
        assert [t.name for t in Agent(ScriptedBackend([]), ["test_search", add]).tools] == ["search", "add"]
        with pytest.raises(ModuleNotFoundError):
            get_tool("test_lazy")
        with pytest.raises(KeyError, match="no tool is registered as 'nope'"):
            get_tool("nope")
    finally:
        for name in ("test_search", "test_factory", "test_lazy"):
            unregister_tool(name)


# ---------------------------------------------------------------------------------------------- the loop
def test_well_formed_call_then_final_answer() -> None:
    backend = ScriptedBackend([
        'Thought: I should search.\nAction: search\nAction Input: {"query": "Qwen"}\nObservation: made up',
        " I now know the final answer.\nFinal Answer: Qwen is a model.",
    ])
    r = Agent(backend, [search]).run("What is Qwen?")
    assert isinstance(r, AgentResult)
    assert (r.answer, r.final_answer, r.stopped) == ("Qwen is a model.", "Qwen is a model.", "final_answer")
    assert r.steps == [("I should search.", "search", '{"query": "Qwen"}', "results for Qwen")]
    assert CALLS == [("search", "Qwen")]
    assert backend.stops == [["Observation:"], ["Observation:"]]

    first = SYS + user(instruction(SEARCH_LINE, "search") + "What is Qwen?") + assistant("", open_=True)
    scratch = ('Thought: I should search.\nAction: search\nAction Input: {"query": "Qwen"}'
               "\nObservation: results for Qwen\nThought:")
    assert backend.texts == [first, first + scratch]
    assert r.response == scratch + " I now know the final answer.\nFinal Answer: Qwen is a model."
    assert r.transcript == first + r.response
    assert r.history == [("What is Qwen?", r.response)]


def test_final_answer_without_thought_and_no_action_text() -> None:
    r = Agent(ScriptedBackend(["Final Answer:42"]), [search]).run("q")
    assert (r.answer, r.stopped, r.steps) == ("42", "final_answer", [])
    r = Agent(ScriptedBackend(["Thought: Hello there, friend."]), [search]).run("q")
    assert (r.answer, r.stopped) == ("Hello there, friend.", "no_action")  # react_demo: the text is the reply


def test_missing_action_input() -> None:
    backend = ScriptedBackend(["Thought: look it up\nAction: search", "Final Answer: gave up"])
    r = Agent(backend, [search]).run("q")
    assert r.steps[0][:3] == ("look it up", "search", "")
    assert r.steps[0].observation == "Error: tool 'search' needs the argument 'query'; write the Action Input as " \
                                     '{"query": ...}'
    assert backend.texts[1].endswith("Thought: look it up\nAction: search\nObservation: " + r.steps[0].observation
                                     + "\nThought:")
    # the input on the line after the Action is still used; a Final Answer after a bare Action wins
    assert parse_output('Action: search\n{"query": "x"}').action_input == '{"query": "x"}'
    p = parse_output("Thought: none needed\nAction: None\nFinal Answer: hi")
    assert (p.action, p.final_answer) == (None, "hi")


def test_trailing_text_after_the_action_input() -> None:
    backend = ScriptedBackend(['Action: add\nAction Input: {"a": 2, "b": 5} and then I will answer.\n\nOK?',
                               "Final Answer: 7"])
    r = Agent(backend, [add]).run("2+5?")
    assert r.steps[0].action_input == '{"a": 2, "b": 5} and then I will answer.\n\nOK?'
    assert r.steps[0].observation == "7" and r.answer == "7"


def test_bad_json_is_rescued_by_json5() -> None:
    pytest.importorskip("json5")
    r = Agent(ScriptedBackend(["Action: add\nAction Input: {a: 2, 'b': 3,}", "Final Answer: 5"]), [add]).run("q")
    assert r.steps[0].observation == "5"


def test_without_json5_plain_json_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "json5", None)  # makes `import json5` raise ImportError
    replies = ["Action: add\nAction Input: {a: 2}", 'Action: add\nAction Input: {"a": 2}', "Final Answer: 3"]
    r = Agent(ScriptedBackend(replies), [add]).run("q")
    assert r.steps[0].observation.startswith("Error: the Action Input of tool 'add' is not a JSON object")
    assert r.steps[1].observation == "3"


def test_total_garbage_input() -> None:
    replies = ["Action: add\nAction Input: }{ garbage", "Action: search\nAction Input: }{ garbage", "Final Answer: x"]
    r = Agent(ScriptedBackend(replies), [add, search]).run("q")
    assert r.steps[0].observation == ("Error: the Action Input of tool 'add' is not a JSON object: '}{ garbage'. "
                                      'Write it as {"a": ..., "b": ...}')
    assert r.steps[1].observation == "results for }{ garbage"  # one parameter: the raw text


def test_unknown_tool_and_empty_action() -> None:
    replies = ["Action: google\nAction Input: {}", "Action:\nAction Input: {}", "Final Answer: done"]
    r = Agent(ScriptedBackend(replies), [search, add]).run("q")
    assert r.steps[0].observation == ('Error: there is no tool named "google". The available tools are: search, add. '
                                      "Use one of them, or give the Final Answer.")
    assert r.steps[1].observation.startswith("Error: the Action names no tool. The available tools are: search, add.")
    assert r.stopped == "final_answer"


def test_tool_exception_becomes_the_observation() -> None:
    r = Agent(ScriptedBackend(['Action: explode\nAction Input: {"reason": "x"}', "Final Answer: sorry"]),
              [explode]).run("q")
    assert r.steps[0].observation == "Error: the tool explode raised RuntimeError: boom: x"
    assert r.answer == "sorry"


def test_step_limit() -> None:
    call = 'Thought: again\nAction: add\nAction Input: {"a": 1}'
    backend = ScriptedBackend([call] * 5)
    r = Agent(backend, [add], max_steps=2).run("loop forever")
    assert r.stopped == "step_limit"
    assert r.answer == "Stopped: the step limit of 2 tool calls was reached without a final answer."
    assert len(r.steps) == 2 and len(backend.prompts) == 3 and len(CALLS) == 2  # the 3rd call is not run
    assert r.response.endswith(call)


def test_multi_turn_history_prompts_follow_react_demo() -> None:
    backend = ScriptedBackend(["Thought: no tool needed.\nFinal Answer: Hello!\n",
                               'Thought: search\nAction: search\nAction Input: {"query": "Jay"}',
                               " I now know the final answer.\nFinal Answer: A singer.",
                               "Final Answer: third"])
    agent = Agent(backend, [search])
    r1 = agent.run("\nHi  ")
    r2 = agent.run("Who is Jay?", history=r1.history)
    agent.run("And?", history=r2.history)
    q_tools = instruction(SEARCH_LINE, "search")
    # build_input_text strips the user text after the instruction is put in front of it: the
    # question's own leading newline stays inside the tool turn, and goes in the plain one
    turn1 = SYS + user(q_tools + "\nHi") + assistant("", open_=True)
    # turn 2: the tools go with the previous (completed) question, the new one is plain
    turn2 = (SYS + user(q_tools + "\nHi") + assistant("Thought: no tool needed.\nFinal Answer: Hello!")
             + user("Who is Jay?") + assistant("", open_=True))
    turn2_step2 = turn2 + ('Thought: search\nAction: search\nAction Input: {"query": "Jay"}\n'
                           "Observation: results for Jay\nThought:")
    # turn 3: they move to turn 2's question; turn 1's goes back to plain
    turn3 = (SYS + user("Hi") + assistant("Thought: no tool needed.\nFinal Answer: Hello!")
             + user(q_tools + "Who is Jay?")
             + assistant('Thought: search\nAction: search\nAction Input: {"query": "Jay"}\n'
                         "Observation: results for Jay\nThought: I now know the final answer.\nFinal Answer: A singer.")
             + user("And?") + assistant("", open_=True))
    assert backend.texts == [turn1, turn2, turn2_step2, turn3]
    assert r1.history == [("\nHi  ", "Thought: no tool needed.\nFinal Answer: Hello!\n")]
    # react_demo.py's {"user", "bot"} dicts are accepted too
    assert build_prompt("Who is Jay?", [{"user": "\nHi  ", "bot": "Thought: no tool needed.\nFinal Answer: Hello!\n"}],
                        [search]).text() == turn2


def test_stream_events_in_order() -> None:
    backend = ScriptedBackend([
        'Thought: I should\nlook.\nAction: search\nAction Input: {"query": "x"}',
        " Found it.\nFinal Answer: It is\nx.",
    ], chunk_size=2)
    events = list(Agent(backend, [search]).stream("q"))
    summary = []
    for e in events:
        if summary and summary[-1][0] == e.kind and e.kind in ("thought", "answer"):
            summary[-1] = (e.kind, summary[-1][1] + e.text)
        else:
            summary.append((e.kind, e.text or e.tool))
    assert summary == [("thought", "I should\nlook."), ("action", "search"), ("observation", "results for x"),
                       ("thought", "Found it."), ("answer", "It is\nx."), ("final", "It is\nx.")]
    assert events[1].step == 0 and events[-1].result is not None and events[-1].result.steps[0].action == "search"
    action = next(e for e in events if e.kind == "action")
    assert (action.tool, action.arguments) == ("search", '{"query": "x"}')


def test_section_stream_does_not_depend_on_chunking() -> None:
    text = "Thought: a\n\nb\nActual text\nFinal Answer:  c\nThoughtful\nFinal"
    def merged(pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for kind, t in pieces:
            if out and out[-1][0] == kind:
                out[-1] = (kind, out[-1][1] + t)
            else:
                out.append((kind, t))
        return out

    whole = SectionStream()
    expected = merged(whole.feed(text) + whole.finish())
    assert expected == [("thought", "a\n\nb\nActual text"), ("answer", "c\nThoughtful\nFinal")]
    by_char = SectionStream()
    assert merged([p for ch in text for p in by_char.feed(ch)] + by_char.finish()) == expected


# ---------------------------------------------------------------------------------------------- backends
@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    from qwen import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained("qwen-demo")
    return AutoModelForCausalLM.from_pretrained("qwen-demo", progress=False).eval(), tok


def test_local_and_server_prompts_are_the_same_ids(demo) -> None:  # type: ignore[no-untyped-def]
    from qwen.serve.protocol import build_chat_prompt

    _, tok = demo
    first = build_prompt("Who is Jay?", [("Hi", "Final Answer: Hello!")], [search])
    step = first.continued('Thought: s\nAction: search\nAction Input: {"query": "Jay"}', "results <|im_start|>", "search")
    for prompt in (first, step):
        ids = prompt_ids(tok, prompt)
        assert tok.decode(ids) == prompt.text()
        server = build_chat_prompt(tok, {"messages": OpenAIBackend.messages(prompt)})
        assert server.ids == ids and server.continuation == (prompt is step)
    assert tok.im_start_id not in prompt_ids(tok, step)[-10:]  # a tool's text cannot open a turn


def test_local_backend_on_the_demo_model(demo) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    agent = Agent(LocalBackend(model, tok, max_new_tokens=6), [search, add], max_steps=1)
    r = agent.run("What is 2 + 3?")
    assert isinstance(r, AgentResult) and r.stopped in ("final_answer", "no_action", "step_limit")
    assert r.transcript.startswith(SYS) and len(r.steps) <= 1
    events = list(agent.stream("Hi", history=r.history))
    assert events[-1].kind == "final"


def test_openai_backend_against_qwen_serve(demo) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    from qwen.serve.app import create_app
    from qwen.serve.engine import Engine
    from serve_helpers import ServerThread

    model, tok = demo
    with Engine(model, tok, max_batch_size=2) as engine:
        app = create_app(engine, tok, model_id="qwen-demo", generation_config=model.generation_config)
        with ServerThread(app) as url:
            backend = OpenAIBackend(url + "/v1", "qwen-demo", "unused", max_tokens=6)
            local = LocalBackend(model, tok, max_new_tokens=6)
            step = build_prompt("What is 2 + 3?", tools=[add]).continued(
                'Thought: add\nAction: add\nAction Input: {"a": 2, "b": 3}', "5", "add")
            # greedy on the same ids: the server continues the open turn exactly as the local model does
            assert backend.complete(step, ["Observation:"]) == local.complete(step, ["Observation:"])
            assert "".join(backend.stream(step, ["Observation:"])) == local.complete(step, ["Observation:"])
            r = Agent(backend, [add], max_steps=1).run("What is 2 + 3?")
            assert isinstance(r, AgentResult) and r.transcript.startswith(SYS)


def test_scripted_backend_runs_out_loudly() -> None:
    with pytest.raises(IndexError, match="ScriptedBackend has 0 replies"):
        Agent(ScriptedBackend([]), [search]).run("q")
    assert isinstance(ReactPrompt("s", [], "q").text(), str)
