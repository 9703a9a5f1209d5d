"""The tools panel of ``qwen web``: with tools selected, a ReAct agent answers through the shared engine.

Scripted engine replies (tests/test_web.py's FakeEngine) drive the exact paths: a tool call shown as
collapsible bubbles, the final answer as the reply, code-interpreter figures as images, and the
trace kept when later turns are plain chat. The real engine + demo model checks nothing breaks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gradio")

from test_web import FakeEngine, greedy, run  # noqa: E402

from qwen import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from qwen.agent import AgentEvent  # noqa: E402
from qwen.serve.engine import Engine  # noqa: E402
from qwen.serve.web import TraceView, UserChat, WebChat, create_web_app, to_messages  # noqa: E402

CALL = 'Thought: I need the calculator.\nAction: calculator\nAction Input: {"expression": "37 * 91 + 5"}\n'
FINAL = "Thought: I now know the final answer\nFinal Answer: 37 * 91 + 5 = 3372."


@pytest.fixture(scope="module")
def demo() -> tuple[Any, Any]:
    return AutoModelForCausalLM.from_pretrained("qwen-demo", progress=False).eval(), AutoTokenizer.from_pretrained("qwen-demo")


def test_agent_turn_shows_tool_calls_and_keeps_the_answer(demo: tuple[Any, Any]) -> None:
    fake = FakeEngine([CALL, FINAL, "plain reply"])
    chat = WebChat(fake, *demo)  # type: ignore[arg-type]
    steps = run(chat.submit("What is 37 * 91 + 5?", None, "You are a helpful assistant.", greedy(chat),
                            ["calculator"]))
    user = steps[-1][1]
    assert isinstance(user, UserChat)
    assert user.history == [("What is 37 * 91 + 5?", "37 * 91 + 5 = 3372.")]
    final = steps[-1][0]
    titles = [m.get("metadata", {}).get("title") for m in final]
    assert titles == [None, "Thought", "Tool: calculator", "Result of calculator", "Thought", None]
    assert final[2]["content"] == '```\n{"expression": "37 * 91 + 5"}\n```'
    assert final[3]["content"] == "```\n3372\n```"
    assert final[-1] == {"role": "assistant", "content": "37 * 91 + 5 = 3372."}
    first_prompt = demo[1].decode(fake.prompts[0])
    assert "calculator: Call this tool to interact with the Calculator API." in first_prompt
    second_prompt = demo[1].decode(fake.prompts[1])
    assert second_prompt.endswith("Observation: 3372\nThought:")  # the open assistant turn continues
    # A later plain turn: the agent is dropped, the earlier turn still shows its trace.
    steps = run(chat.submit("thanks", user, "You are a helpful assistant.", greedy(chat), []))
    assert user.agent is None and user.history[-1] == ("thanks", "plain reply")
    assert steps[-1][0] == to_messages(user.history, traces=user.traces)
    assert [m.get("metadata", {}).get("title") for m in steps[-1][0]][:4] == [None, "Thought", "Tool: calculator",
                                                                              "Result of calculator"]
    assert "37 * 91 + 5 = 3372." in demo[1].decode(fake.prompts[2])  # the answer is in the chat history
    chat.clear(user)
    assert user.traces == {} and user.history == []


def test_code_interpreter_figures_become_images(demo: tuple[Any, Any]) -> None:
    code = "Action: code_interpreter\nAction Input:\n```py\nimport matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\n```\n"
    fake = FakeEngine([code, "Final Answer: here is the plot"])
    chat = WebChat(fake, *demo)  # type: ignore[arg-type]
    steps = run(chat.submit("plot something", None, "You are a helpful assistant.", greedy(chat),
                            ["code_interpreter"]))
    user = steps[-1][1]
    images = [m["content"]["path"] for m in steps[-1][0] if isinstance(m["content"], dict)]
    assert len(images) == 1 and Path(images[0]).read_bytes()[:4] == b"\x89PNG"
    workdir = user.agent.tools_by_name["code_interpreter"].workdir
    user.close()  # the tab went away: the sandbox and its directory go too
    assert user.agent is None and not workdir.exists()


def test_regenerate_an_agent_turn_and_unknown_tools(demo: tuple[Any, Any]) -> None:
    fake = FakeEngine([FINAL, "Final Answer: again"])
    chat = WebChat(fake, *demo)  # type: ignore[arg-type]
    user = run(chat.submit("q", None, "s", greedy(chat), ["calculator"]))[-1][1]
    run(chat.regenerate(user, "s", greedy(chat), ["calculator"]))
    assert user.history == [("q", "again")]
    steps = run(chat.submit("q2", user, "s", greedy(chat), ["rm_rf"]))
    assert user.history == [("q", "again")] and steps[-1][2] == "q2"  # refused; the message stays in the box


def test_trace_view_merges_thought_pieces() -> None:
    view = TraceView()
    for ev in [AgentEvent("thought", "I need "), AgentEvent("thought", "a tool."),
               AgentEvent("action", tool="calculator", arguments='{"expression": "1+1"}'),
               AgentEvent("observation", "2", tool="calculator"), AgentEvent("answer", "It is "),
               AgentEvent("answer", "2."), AgentEvent("final", "It is 2.")]:
        view.add(ev)
    shown = view.view()
    assert shown[0] == {"role": "assistant", "content": "I need a tool.", "metadata": {"title": "Thought"}}
    assert shown[-1] == {"role": "assistant", "content": "It is 2."} and len(shown) == 4


def test_real_engine_with_tools_and_the_page_has_the_panel(demo: tuple[Any, Any]) -> None:
    import gradio as gr

    with Engine(*demo, max_batch_size=2) as engine:
        chat = WebChat(engine, *demo)
        settings = greedy(chat)
        settings.max_new_tokens = 24
        steps = run(chat.submit("What is 2 + 3?", None, "You are a helpful assistant.", settings, ["calculator"]))
        assert len(steps[-1][1].history) == 1
        app = create_web_app(engine, *demo)
        boxes = [b for b in app.blocks.values() if isinstance(b, gr.CheckboxGroup)]
        assert len(boxes) == 1 and boxes[0].label == "Tools the model may use"
