"""The agent's built-in tools (qwen/agent/builtin.py) and the `qwen agent` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen.agent import Agent, ScriptedBackend, ToolInputError, get_tool
from qwen.agent.builtin import CalculatorError, CodeInterpreter, calculate
from qwen.commands import agent as agent_cmd


@pytest.mark.parametrize("expr, value", [
    ("1 + 2 * 3", "7"), ("(12 + 7) * 3 / 2", "28.5"), ("2 ** 100", str(2**100)), ("7 // 2", "3"), ("-7 % 3", "2"),
    ("sqrt(16)", "4"), ("6 / 3", "2"), ("2^10", "1024"), ("3 × 4 ÷ 6", "2"), ("round(pi, 4)", "3.1416"),
    ("factorial(20)", "2432902008176640000"), ("gcd(12, 18)", "6"), ("1e3 + 0.5", "1000.5"), ("37 * 91 + 5 =", "3372"),
])
def test_calculator_values(expr: str, value: str) -> None:
    assert calculate(expr) == value


@pytest.mark.parametrize("expr, needle", [
    ("__import__('os').system('true')", "unsupported syntax"), ("open('/etc/passwd')", "unsupported syntax"),
    ("10 ** 10 ** 10", "too large"), ("factorial(100000)", "too large"), ("1 / 0", "division by zero"),
    ("x + 1", "unknown name 'x'"), ("", "empty expression"), ("1 +", "not an arithmetic expression"),
    ("(1).__class__", "unsupported syntax"), ("sqrt(-1)", "ValueError"),
])
def test_calculator_refuses_what_is_not_arithmetic(expr: str, needle: str) -> None:
    with pytest.raises(CalculatorError, match=needle):
        calculate(expr)


def test_calculator_tool_through_the_agent() -> None:
    backend = ScriptedBackend([
        'Thought: I should compute it.\nAction: calculator\nAction Input: {"expression": "37 * 91 + 5"}\n',
        "Thought: I now know the final answer\nFinal Answer: 3372",
    ])
    result = Agent(backend, ["calculator"]).run("What is 37 * 91 + 5?")
    assert result.answer == "3372" and result.stopped == "final_answer"
    assert result.steps[0].observation == "3372"
    bad = Agent(ScriptedBackend(['Action: calculator\nAction Input: {"expression": "import os"}\n',
                                 "Final Answer: sorry"]), ["calculator"]).run("?")
    assert bad.steps[0].observation.startswith("Error: the tool calculator raised CalculatorError")


def test_code_interpreter_keeps_state_and_returns_figures(tmp_path: Path) -> None:
    with CodeInterpreter(workdir=tmp_path / "work") as ci:
        assert "result: 21" in ci.call("```py\nx = 21\nx\n```")
        out = ci.call("```python\nprint(x * 2)\nimport matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\n```")
        assert "stdout:\n42" in out
        image = out.split("![figure](")[1].split(")")[0]
        assert Path(image).read_bytes()[:4] == b"\x89PNG" and Path(image).parent == (tmp_path / "work").resolve()
        assert "error: ZeroDivisionError" in ci.call("```py\n1 / 0\n```")
        assert "network" in ci.call("```py\nimport socket\nsocket.create_connection(('127.0.0.1', 9), 1)\n```")
        assert ci.run(code="  ").startswith("error: no code")
        with pytest.raises(ToolInputError, match="needs the argument 'code'"):
            ci.call("")
    assert ci._session is None  # closed by the context manager


def test_code_interpreter_is_registered_and_closed_by_the_agent() -> None:
    backend = ScriptedBackend(["Action: code_interpreter\nAction Input:\n```py\nprint(6 * 7)\n```\n",
                               "Final Answer: 42"])
    with Agent(backend, ["code_interpreter"]) as agent:
        result = agent.run("six times seven?")
        tool = agent.tools_by_name["code_interpreter"]
        workdir = tool.workdir
        assert workdir.is_dir()
    assert result.steps[0].observation == "stdout:\n42" and result.answer == "42"
    assert not workdir.exists()  # the temporary working directory went with the session
    assert get_tool("code_interpreter") is not get_tool("code_interpreter")  # a fresh session per agent


def test_tools_file_and_errors(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "my_tools.py"
    f.write_text("from qwen.agent import tool\n\n@tool\ndef shout(text: str) -> str:\n"
                 "    '''Upper-case a text.\n\n    Args:\n        text: what to shout.\n    '''\n    return text.upper()\n")
    tools = agent_cmd.load_tools_file(f)
    assert [t.name for t in tools] == ["shout"] and tools[0].call('{"text": "hi"}') == "HI"
    empty = tmp_path / "none.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no qwen.agent.Tool"):
        agent_cmd.load_tools_file(empty)
    assert agent_cmd.main(["--tools-file", str(tmp_path / "missing.py"), "--query", "hi"]) == 1
    assert "missing.py: no such tools file" in capsys.readouterr().err
    assert agent_cmd.main(["--tools", "nonexistent", "--query", "hi"]) == 1
    assert "no tool is registered as 'nonexistent'" in capsys.readouterr().err


def test_agent_command_one_query_writes_a_transcript(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "t.json"
    assert agent_cmd.main(["--query", "What is 2 + 3?", "--greedy", "--max-new-tokens", "24", "--transcript", str(out),
                           "--tools", "calculator"]) == 0
    printed = capsys.readouterr().out
    turns = json.loads(out.read_text())
    assert len(turns) == 1 and turns[0]["query"] == "What is 2 + 3?"
    assert "calculator: Call this tool to interact with the Calculator API." in turns[0]["transcript"]
    assert f"Answer: {turns[0]['answer']}" in printed
