"""A ReAct agent over any Qwen-Chat model, as the official ``examples/react_demo.py`` runs one.

    from qwen.agent import Agent, LocalBackend, OpenAIBackend, tool

    @tool
    def add(a: int, b: int) -> int:
        '''Add two integers.

        Args:
            a: the first addend.
            b: the second addend.
        '''
        return a + b

    agent = Agent(OpenAIBackend("http://127.0.0.1:8000/v1", model="qwen"), [add])
    result = agent.run("What is 2 + 3?")
    result.answer, result.steps, result.stopped

``Agent.stream`` yields the thoughts, actions and observations as they happen. Tools are plain
:class:`Tool` objects; built-in ones are registered by name with :func:`register_tool`.
"""

from .agent import Agent, AgentEvent, AgentResult, AgentStep
from .backends import EngineBackend, LocalBackend, ModelBackend, OpenAIBackend, ScriptedBackend, prompt_ids
from .react import ParsedOutput, ReactPrompt, SectionStream, build_prompt, parse_output, react_question, tool_line
from .tools import (
    Tool,
    ToolInputError,
    ToolParam,
    as_tool,
    get_tool,
    parse_docstring,
    register_tool,
    registered_tools,
    schema_for,
    tool,
    unregister_tool,
)

# Built-in tools by name (imported on first use: the code interpreter starts its sandbox lazily).
register_tool("calculator", "qwen.agent.builtin:calculator_tool")
register_tool("code_interpreter", "qwen.agent.builtin:CodeInterpreter")

__all__ = [
    "Agent", "AgentEvent", "AgentResult", "AgentStep",
    "EngineBackend", "LocalBackend", "ModelBackend", "OpenAIBackend", "ScriptedBackend", "prompt_ids",
    "ParsedOutput", "ReactPrompt", "SectionStream", "build_prompt", "parse_output", "react_question", "tool_line",
    "Tool", "ToolInputError", "ToolParam", "as_tool", "get_tool", "parse_docstring", "register_tool",
    "registered_tools", "schema_for", "tool", "unregister_tool",
]
